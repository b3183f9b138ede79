"""Slash commands change what the next request carries; they run in-process against a loopback server."""

from __future__ import annotations

import io
import json

import pytest
from prompt_toolkit.document import Document
from rich.console import Console

from kubrick.chat.commands import EXIT, SlashCommands, SlashCompleter
from kubrick.chat.render import PlainRenderer
from kubrick.chat.session import ChatSession
from kubrick.chat.store import ConversationStore
from kubrick.client import TritonClient
from kubrick.config import resolve_settings
from scripted_triton import ScriptedTriton, chat_reply


def echo_model(body):
    return chat_reply("echo: " + json.loads(body["text_input"])[-1]["content"])


class Chat:
    """A session plus its commands, printing into a string."""

    def __init__(self, server, home):
        settings = resolve_settings({"triton_url": server.url}, environ={})
        self.server = server
        self.client = TritonClient(server.url, settings.model_name)
        self.session = ChatSession(settings, self.client, ConversationStore(home / "conversations"))
        self.out = io.StringIO()
        self.commands = SlashCommands(self.session, Console(file=self.out, width=200),
                                      ask_again=lambda: self.session.retry(PlainRenderer(io.StringIO())))

    def ask(self, text):
        return self.session.ask(text, PlainRenderer(io.StringIO()))

    def run(self, line):
        self.out.seek(0)
        self.out.truncate()
        result = self.commands.handle(line)
        return result, self.out.getvalue()

    def last_request(self):
        request = self.server.requests[-1]
        return json.loads(request["text_input"]), request["parameters"], request["model"]


@pytest.fixture
def chat(kubrick_home):
    with ScriptedTriton({"llm_decoupled": echo_model, "other": echo_model}) as server:
        chat = Chat(server, kubrick_home)
        yield chat
        chat.client.close()


def test_set_changes_the_next_request_and_refuses_bad_values(chat):
    chat.run("/set temperature 0.25")
    chat.run("/set max_tokens 50")
    chat.run("/set seed 3")
    chat.ask("q")
    _, params, _ = chat.last_request()
    assert params["temperature"] == 0.25 and params["max_tokens"] == 50 and params["seed"] == 3
    _, said = chat.run("/set temperature hot")
    assert "bad temperature: expected a number, got 'hot'" in said
    _, said = chat.run("/set colour blue")
    assert "/set knows temperature, top_p, max_tokens, seed" in said


def test_reasoning_sets_effort_and_visibility(chat):
    chat.run("/reasoning high")
    chat.run("/reasoning hide")
    chat.ask("q")
    assert chat.last_request()[1]["reasoning_effort"] == "high"
    assert chat.session.settings.hide_reasoning is True
    _, said = chat.run("/reasoning extreme")
    assert "low, medium, high, show or hide" in said


def test_system_prompt_goes_first_in_the_next_request(chat):
    chat.run("/system You are a pirate.")
    chat.ask("hello")
    messages, _, _ = chat.last_request()
    assert messages[0] == {"role": "system", "content": "You are a pirate."}
    chat.run("/system none")
    chat.ask("again")
    assert chat.last_request()[0][0]["role"] == "user"


def test_retry_asks_the_last_question_again_without_the_old_reply(chat):
    chat.ask("first")
    chat.ask("second")
    chat.run("/retry")
    messages, _, _ = chat.last_request()
    assert [m["content"] for m in messages] == ["first", "echo: first", "second"]
    assert [m["content"] for m in chat.session.conversation.messages][-2:] == ["second", "echo: second"]
    assert len(chat.session.conversation.messages) == 4


def test_clear_starts_a_new_conversation_and_keeps_the_old_one(chat):
    chat.ask("old topic")
    old_id = chat.session.conversation.id
    chat.run("/clear")
    chat.ask("new topic")
    assert [m["content"] for m in chat.last_request()[0]] == ["new topic"]
    assert chat.session.conversation.id != old_id
    assert chat.session.store.load(old_id).messages[0]["content"] == "old topic"


def test_save_list_and_load_by_name(chat):
    chat.ask("about cats")
    _, said = chat.run("/save cats")
    assert "as 'cats'" in said
    chat.run("/clear")
    chat.ask("about dogs")
    _, listing = chat.run("/list")
    assert "cats" in listing and "about dogs" in listing
    _, said = chat.run("/load cats")
    assert "about cats" in said
    chat.ask("more")
    assert [m["content"] for m in chat.last_request()[0]] == ["about cats", "echo: about cats", "more"]


def test_model_switches_only_to_models_the_server_has(chat):
    _, said = chat.run("/model nonexistent")
    assert "no model 'nonexistent'" in said and "llm_decoupled, other" in said
    chat.run("/model other")
    chat.ask("q")
    assert chat.last_request()[2] == "other"


def test_stats_help_and_exit(chat):
    chat.ask("q")
    _, stats = chat.run("/stats")
    assert "2 messages" in stats and str(chat.session.store.path_for(chat.session.conversation)) in stats
    _, help_text = chat.run("/help")
    for name in ("/help", "/clear", "/system", "/reasoning", "/set", "/model", "/retry", "/save", "/load", "/list",
                 "/stats", "/exit"):
        assert name in help_text
    assert chat.run("/exit")[0] == EXIT
    assert chat.run("/quit")[0] == EXIT
    _, said = chat.run("/frobnicate")
    assert "unknown command" in said


def completions(chat, text):
    completer = SlashCompleter(chat.session)
    return [c.text for c in completer.get_completions(Document(text), None)]


def test_tab_completion_of_commands_and_their_choices(chat):
    assert completions(chat, "/re") == ["/reasoning", "/retry"]
    assert completions(chat, "/reasoning h") == ["high", "hide"]
    assert completions(chat, "/set t") == ["temperature", "top_p"]
    assert completions(chat, "hello /") == []
    chat.ask("q")
    assert completions(chat, "/load ") == [chat.session.conversation.id]


def test_an_unset_seed_reads_none_as_it_is_typed(chat):
    _, said = chat.run("/set seed none")
    assert said.strip() == "seed = none"
    _, said = chat.run("/set")
    assert "seed = none" in said and "None" not in said
    _, stats = chat.run("/stats")
    assert "seed none" in stats and "None" not in stats
