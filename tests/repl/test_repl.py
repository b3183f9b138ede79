"""The real `kubrick` REPL in a tmux pane: ask and see the answer, Ctrl-C a slow reply, new lines, history, exit.

Set KUBRICK_REPL_TEST_URL to also run the ask-and-answer test against another server (a real tritonserver).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from scripted_triton import ScriptedTriton, chat_reply, sse
from tmux_kubrick import KubrickInTmux, tmux_available

pytestmark = pytest.mark.skipif(not tmux_available(), reason="needs tmux")


def echo_model(body):
    question = json.loads(body["text_input"])[-1]["content"]
    answer = f"You asked **{question.replace(chr(10), ' / ')}**.\n\n```python\nprint('code block')\n```\n\nThat is all."
    return chat_reply(answer, reasoning="Considering the question.", pieces=8, pause=0.02)


def slow_model(body):
    for i in range(600):  # a minute of words unless the client goes away
        yield sse({"type": "chunk", "content": f"word{i} "})
        yield 0.1


@pytest.fixture
def server():
    with ScriptedTriton({"llm_decoupled": echo_model, "slow": slow_model}) as running:
        yield running


def servers_to_ask():
    urls = ["scripted"]
    if os.environ.get("KUBRICK_REPL_TEST_URL"):
        urls.append(os.environ["KUBRICK_REPL_TEST_URL"])
    return urls


@pytest.mark.parametrize("target", servers_to_ask())
def test_ask_see_the_answer_and_exit(target, server, tmp_path):
    url, args = (server.url, ()) if target == "scripted" else (target, ("--max-tokens", "48"))
    with KubrickInTmux(url, tmp_path / "home", args=args) as k:
        k.wait_for("›")
        k.type("What is Kubrick?")
        k.keys("Enter")
        screen = k.wait_for("tokens", after="What is Kubrick?", timeout=300)
        if target == "scripted":
            assert "You asked What is Kubrick?." in screen  # Markdown rendered: no ** left
            assert "print('code block')" in screen and "```" not in screen
            assert "Considering the question." in screen
        k.type("/exit")
        k.keys("Enter")
        assert k.exit_status() == 0


def test_ctrl_c_stops_a_slow_reply_keeps_it_and_the_server_sees_the_disconnect(server, tmp_path):
    with KubrickInTmux(server.url, tmp_path / "home", args=("--model-name", "slow")) as k:
        k.wait_for("›")
        k.type("tell me a long story")
        k.keys("Enter")
        k.wait_for("word3", after="long story")
        k.keys("C-c")
        screen = k.wait_for("partial reply is kept", after="long story")
        assert server.disconnected.wait(timeout=10)
        assert "word0 word1 word2 word3" in screen
        k.type("and then?")
        k.keys("Enter")  # the next question carries the partial reply as context
        k.wait_for("word1", after="and then?")
        k.keys("C-c")
        k.wait_for("partial reply is kept", after="and then?")
        sent = json.loads(server.requests[-1]["text_input"])
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[1]["content"].startswith("word0 word1 word2 word3")
        k.keys("C-d")
        assert k.exit_status() == 0
    [saved] = (tmp_path / "home" / "conversations").glob("*.json")
    statuses = [m.get("status") for m in json.loads(saved.read_text())["messages"] if m["role"] == "assistant"]
    assert statuses == ["cancelled", "cancelled"]


def test_alt_enter_and_multiline_paste_add_lines_and_enter_sends(server, tmp_path):
    with KubrickInTmux(server.url, tmp_path / "home") as k:
        k.wait_for("›")
        k.type("line one")
        k.keys("Escape", "Enter")  # what Alt+Enter sends
        k.type("line two")
        k.keys("Enter")
        k.wait_for("tokens", after="line two")
        assert json.loads(server.requests[-1]["text_input"])[-1]["content"] == "line one\nline two"
        k.paste("pasted first line\nsecond line\nthird line")  # a multi-line paste does not send by itself
        k.keys("Enter")
        k.wait_for("tokens", after="third line")
        assert json.loads(server.requests[-1]["text_input"])[-1]["content"] == (
            "pasted first line\nsecond line\nthird line")
        k.keys("C-d")
        assert k.exit_status() == 0


def test_ctrl_c_twice_at_an_empty_prompt_exits_and_history_persists(server, tmp_path):
    home = tmp_path / "home"
    with KubrickInTmux(server.url, home) as k:
        k.wait_for("›")
        k.type("remember this question")
        k.keys("Enter")
        k.wait_for("tokens", after="remember this question")
        k.type("half typed")
        k.wait_for("› half typed")  # the prompt has the line (a Ctrl-C before that would be one between prompts)
        k.keys("C-c")  # clears the line, does not exit
        k.wait_for("›", after="half typed")
        time.sleep(0.3)  # let the new prompt take the terminal (a key is not a signal then)
        k.press_until("C-c", "›", after="again or Ctrl-D")
        assert not k.exited()  # one Ctrl-C at an empty prompt only warns
        k.press_until("C-c", "KUBRICK-EXITED-")
        assert k.exit_status() == 0
    with KubrickInTmux(server.url, home) as k:  # a new session finds the question in its history
        k.wait_for("›")
        k.keys("C-r")
        k.type("remember")
        screen = k.wait_for("› remember this question")
        assert "I-search backward: remember" in screen
        k.keys("Enter")  # accept the found line
        k.keys("Enter")  # and send it
        k.wait_for("You asked remember this question")
        k.keys("C-d")
        assert k.exit_status() == 0


def test_unreachable_server_exits_with_one_line(tmp_path):
    with KubrickInTmux("127.0.0.1:9", tmp_path / "home") as k:
        assert k.exit_status() == 1
        assert "kubrick: error: cannot reach a Triton server at http://127.0.0.1:9" in k.screen()


def test_unknown_model_at_start_lists_the_models_and_exits(server, tmp_path):
    with KubrickInTmux(server.url, tmp_path / "home", args=("--model-name", "gpt-9")) as k:
        assert k.exit_status() == 1
        screen = k.screen()
        assert "no model named 'gpt-9'" in screen and "llm_decoupled, slow" in screen


def test_long_reply_in_a_script_rich_measures_differently_leaves_no_stale_lines(tmp_path):
    # Devanagari vowel signs: rich counts them 0 columns wide, the terminal 1, so lines are wider than rich thinks
    words = [f"कामा{i:03d}" for i in range(400)]

    def hindi(body):
        return chat_reply(" ".join(words), reasoning=" ".join(w.replace("कामा", "सोचा") for w in words),
                          pieces=200, pause=0.005)

    with ScriptedTriton({"llm_decoupled": hindi}) as server, \
            KubrickInTmux(server.url, tmp_path / "home", width=60, height=15) as k:
        k.wait_for("›")
        k.type("नमस्ते")
        k.keys("Enter")
        k.wait_for("tokens", after="नमस्ते", timeout=60)
        screen = k.screen()
    for word in words[::7]:
        assert screen.count(word) <= 1, f"{word} drawn {screen.count(word)} times:\n{screen}"
        assert screen.count(word.replace("कामा", "सोचा")) <= 1


def test_one_answer_in_a_terminal_is_rendered_and_an_error_is_said_once(tmp_path):
    def failing(body):
        return [sse({"type": "chunk", "content": "**Partial** answer"}), sse({"error": "engine exploded"}, wrap=False)]

    with ScriptedTriton({"llm_decoupled": failing}) as server, \
            KubrickInTmux(server.url, tmp_path / "home", args=("-p", "hi")) as k:
        assert k.exit_status() == 1
        screen = k.screen()
    assert "Partial answer" in screen and "**" not in screen  # Markdown rendered on a terminal
    assert screen.count("engine exploded") == 1
    assert "kubrick: error: the server reported an error: engine exploded" in screen


def test_waiting_for_the_first_token_is_shown_and_ctrl_c_there_stops_cleanly(tmp_path):
    def slow_start(body):
        return [30.0] + chat_reply("never seen")  # a long prefill

    with ScriptedTriton({"llm_decoupled": slow_start}) as server, KubrickInTmux(server.url, tmp_path / "home") as k:
        k.wait_for("›")
        k.type("long prompt")
        k.keys("Enter")
        k.wait_for("waiting for the model", after="long prompt")
        k.keys("C-c")
        screen = k.wait_for("stopped", after="long prompt")
        assert "waiting for the model" not in screen.split("long prompt")[-1]
        assert server.disconnected.wait(timeout=10)
        k.keys("C-d")
        assert k.exit_status() == 0
