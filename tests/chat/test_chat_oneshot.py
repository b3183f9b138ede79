"""`kubrick -p`, `echo … | kubrick` and `--json`: the real program against a scripted server on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scripted_triton import ScriptedTriton, chat_reply, sse


def kubrick(*args, home, stdin=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "KUBRICK_"))}
    env["KUBRICK_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "kubrick.cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=60)


def echo_model(body):
    question = json.loads(body["text_input"])[-1]["content"]
    return chat_reply(f"You asked: {question}", reasoning="private thoughts")


@pytest.fixture
def server():
    with ScriptedTriton({"llm_decoupled": echo_model, "other": echo_model}) as running:
        yield running


def test_prompt_flag_prints_only_the_answer(server, tmp_path):
    result = kubrick("-p", "what is 2+2?", "--triton-url", server.url, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "You asked: what is 2+2?\n"
    assert result.stderr == ""


def test_question_on_stdin(server, tmp_path):
    result = kubrick("--triton-url", server.url, home=tmp_path, stdin="from a pipe\n")
    assert result.returncode == 0 and result.stdout == "You asked: from a pipe\n"


def test_json_prints_one_event_per_line(server, tmp_path):
    result = kubrick("-p", "hi", "--json", "--triton-url", server.url, home=tmp_path)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0] == {"type": "reasoning", "content": "private thoughts"}
    assert "".join(e["content"] for e in events if e["type"] == "chunk") == "You asked: hi"
    assert events[-1]["type"] == "complete" and events[-1]["usage"]["completion_tokens"] == 3


def test_settings_and_system_prompt_reach_the_server(server, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_tokens": 64, "temperature": 0.9}))
    result = kubrick("-p", "hi", "--triton-url", server.url, "--temperature", "0.2", "--seed", "7", "-r", "high",
                     "--system", "Be terse.", "--model-name", "other", home=tmp_path)
    assert result.returncode == 0, result.stderr
    request = server.requests[-1]
    assert request["model"] == "other"
    assert request["parameters"] == {"temperature": 0.2, "top_p": 1.0, "max_tokens": 64, "seed": 7,
                                     "reasoning_effort": "high", "streaming": True}
    assert json.loads(request["text_input"]) == [{"role": "system", "content": "Be terse."},
                                                 {"role": "user", "content": "hi"}]


def test_every_turn_is_saved_and_load_continues_it(server, tmp_path):
    kubrick("-p", "first question", "--triton-url", server.url, home=tmp_path)
    [saved] = (tmp_path / "conversations").glob("*.json")
    conversation = json.loads(saved.read_text())
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][1]["reasoning"] == "private thoughts"
    result = kubrick("-p", "second question", "--load", conversation["id"], "--triton-url", server.url, home=tmp_path)
    assert result.returncode == 0, result.stderr
    sent = json.loads(server.requests[-1]["text_input"])
    assert [m["content"] for m in sent] == ["first question", "You asked: first question", "second question"]
    assert len(json.loads(saved.read_text())["messages"]) == 4


def failing_server(frames):
    return ScriptedTriton({"llm_decoupled": lambda body: frames})


def test_error_event_goes_to_stderr_with_nonzero_exit_and_partial_text_kept(tmp_path):
    frames = [sse({"type": "chunk", "content": "Partial "}), sse({"error": "model crashed: out of memory"}, wrap=False)]
    with failing_server(frames) as server:
        result = kubrick("-p", "hi", "--triton-url", server.url, home=tmp_path)
    assert result.returncode == 1
    assert result.stdout == "Partial \n"
    assert result.stderr.startswith("kubrick: error: ") and "model crashed: out of memory" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_cut_off_stream_says_so_and_keeps_the_partial_text(tmp_path):
    with failing_server([sse({"type": "chunk", "content": "The answer is"})]) as server:
        result = kubrick("-p", "hi", "--triton-url", server.url, home=tmp_path)
    assert result.returncode == 1 and result.stdout == "The answer is\n"
    assert "cut off" in result.stderr
    [saved] = (tmp_path / "conversations").glob("*.json")
    reply = json.loads(saved.read_text())["messages"][-1]
    assert reply["content"] == "The answer is" and reply["status"] == "cut_off"


def test_json_mode_reports_errors_as_events_too(tmp_path):
    with failing_server([sse({"type": "error", "content": "prompt too long"})]) as server:
        result = kubrick("-p", "hi", "--json", "--triton-url", server.url, home=tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout.splitlines()[-1])["type"] == "error"
    assert "prompt too long" in result.stderr


def test_unknown_model_lists_what_the_server_has(server, tmp_path):
    result = kubrick("-p", "hi", "--model-name", "gpt-9", "--triton-url", server.url, home=tmp_path)
    assert result.returncode == 1
    assert "'gpt-9'" in result.stderr and "llm_decoupled, other" in result.stderr


def test_unreachable_server_names_the_url_and_suggests_kubrick_serve(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = kubrick("-p", "hi", "--triton-url", f"127.0.0.1:{port}", home=tmp_path)
    assert result.returncode == 1
    assert f"http://127.0.0.1:{port}" in result.stderr and "kubrick serve" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_empty_question_is_refused(server, tmp_path):
    result = kubrick("--triton-url", server.url, home=tmp_path, stdin="\n")
    assert result.returncode == 1 and "nothing to ask" in result.stderr


def test_help_does_not_import_torch_or_the_engine():
    code = ("import sys; from typer.testing import CliRunner; from kubrick.cli import app; "
            "CliRunner().invoke(app, ['--help']); import kubrick.chat.app, kubrick.chat.repl, kubrick.client; "
            "heavy = [m for m in sys.modules if m == 'torch' or (m.startswith('kubrick.engine') and m != 'kubrick.engine.api' and m != 'kubrick.engine')]; "
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_a_reply_stopped_by_max_tokens_says_so_in_json_and_the_store(tmp_path):
    frames = [sse({"type": "chunk", "content": "Once upon"}),
              sse({"type": "complete", "finish_reason": "length", "usage": {"completion_tokens": 2}})]
    with failing_server(frames) as server:
        result = kubrick("-p", "story", "--json", "--max-tokens", "2", "--triton-url", server.url, home=tmp_path)
    assert result.returncode == 0
    assert json.loads(result.stdout.splitlines()[-1])["finish_reason"] == "length"
    [saved] = (tmp_path / "conversations").glob("*.json")
    assert json.loads(saved.read_text())["messages"][-1]["finish_reason"] == "length"


def test_a_question_that_is_not_utf8_is_asked_with_replacement_characters(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "KUBRICK_"))}
    env["KUBRICK_HOME"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "kubrick.cli", "--triton-url", server.url],
                            input="café in Latin-1\n".encode("latin-1"), capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "You asked: caf\ufffd in Latin-1\n"
    (saved,) = (tmp_path / "conversations").glob("*.json")
    assert json.loads(saved.read_text())["messages"][0]["content"] == "caf\ufffd in Latin-1"


def test_a_conversation_folder_that_cannot_be_written_is_one_line(server, tmp_path):
    (tmp_path / "conversations").write_text("a file where the folder should be")
    result = kubrick("-p", "hi", "--triton-url", server.url, home=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("kubrick: error: cannot save the conversation in ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_answer_that_cannot_be_written_is_one_line_on_stderr(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "KUBRICK_"))}
    env["KUBRICK_HOME"] = str(tmp_path)
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "kubrick.cli", "-p", "hi", "--triton-url", server.url],
                                stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "kubrick: error: cannot write the answer to stdout: No space left on device\n"
