"""Slash commands of the REPL: each one is a method here, listed in /help and offered by tab completion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.document import Document
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kubrick.chat.session import ChatSession
from kubrick.config import REASONING_EFFORTS, SETTINGS
from kubrick.errors import KubrickError

SETTABLE = ("temperature", "top_p", "max_tokens", "seed")
EXIT = "exit"


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("/help", "/help", "show this list"),
    Command("/clear", "/clear", "start a new conversation (the old one stays saved)"),
    Command("/system", "/system [text]", "show or set the system prompt of this conversation (/system none removes it)"),
    Command("/reasoning", "/reasoning low|medium|high|show|hide", "set the reasoning effort, or show/hide the reasoning"),
    Command("/set", "/set [name value]", "show the generation settings, or change one: temperature, top_p, max_tokens, seed"),
    Command("/model", "/model [name]", "show the models on the server, or switch to one"),
    Command("/retry", "/retry", "ask the last question again (the previous reply is dropped)"),
    Command("/save", "/save [name]", "save now, optionally giving the conversation a name"),
    Command("/load", "/load <id|name|path>", "continue a saved conversation"),
    Command("/list", "/list", "list saved conversations, newest first"),
    Command("/stats", "/stats", "settings, token counts and the file of this conversation"),
    Command("/exit", "/exit", "leave (Ctrl-D works too)"),
)
NAMES = tuple(c.name for c in COMMANDS)


class SlashCommands:
    """Runs one slash command line against the session; `handle` returns EXIT to leave the REPL."""

    def __init__(self, session: ChatSession, console: Console, ask_again: Callable[[], None]):
        self.session = session
        self.console = console
        self.ask_again = ask_again  # /retry: re-send the last question through the REPL's renderer

    def handle(self, line: str) -> str | None:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        aliases = {"/quit": "/exit", "/q": "/exit", "/?": "/help"}
        name = aliases.get(name.lower(), name.lower())
        if name not in NAMES:
            matches = [n for n in NAMES if n.startswith(name)]
            if len(matches) != 1:
                self.say(f"unknown command {name}; /help lists them", error=True)
                return None
            name = matches[0]
        try:
            return getattr(self, "do_" + name[1:])(arg)
        except KubrickError as err:
            self.say(str(err), error=True)
            return None

    def say(self, message: str, error: bool = False) -> None:
        self.console.print(message, style="red" if error else "dim", markup=False, highlight=False)

    def do_help(self, arg: str) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2))
        for command in COMMANDS:
            table.add_row(Text(command.usage, style="bold"), Text(command.help))
        self.console.print(table)
        self.say("Enter sends · Alt+Enter or Esc Enter: new line · Ctrl-R: search history · "
                 "Ctrl-C: stop a reply · Ctrl-D or Ctrl-C twice: exit")

    def do_exit(self, arg: str) -> str:
        return EXIT

    def do_clear(self, arg: str) -> None:
        self.session.new_conversation()
        self.say("New conversation.")

    def do_system(self, arg: str) -> None:
        conversation = self.session.conversation
        if not arg:
            self.say(f"system prompt: {conversation.system!r}" if conversation.system else "no system prompt")
            return
        conversation.system = "" if arg.lower() == "none" else arg
        self.session.save()
        self.say("System prompt removed." if not conversation.system else "System prompt set.")

    def do_reasoning(self, arg: str) -> None:
        settings = self.session.settings
        choice = arg.lower()
        if choice in REASONING_EFFORTS:
            settings.reasoning_effort = choice
            self.say(f"Reasoning effort: {choice}.")
        elif choice in ("show", "hide"):
            settings.hide_reasoning = choice == "hide"
            self.say("Reasoning will be hidden." if settings.hide_reasoning else "Reasoning will be shown.")
        elif not choice:
            shown = "hidden" if settings.hide_reasoning else "shown"
            self.say(f"Reasoning effort: {settings.reasoning_effort}; reasoning is {shown}.")
        else:
            raise KubrickError(f"/reasoning takes low, medium, high, show or hide, not {arg!r}")

    def do_set(self, arg: str) -> None:
        settings = self.session.settings
        key, _, value = arg.partition(" ")
        if not key:
            for name in SETTABLE:
                self.say(f"{name} = {_shown(getattr(settings, name))}")
            return
        if key not in SETTABLE:
            raise KubrickError(f"/set knows {', '.join(SETTABLE)}, not {key!r}")
        if not value.strip():
            self.say(f"{key} = {_shown(getattr(settings, key))}")
            return
        parse = next(s.parse for s in SETTINGS if s.key == key)
        try:
            setattr(settings, key, parse(value.strip()))
        except (TypeError, ValueError) as err:
            raise KubrickError(f"bad {key}: {err}") from None
        self.say(f"{key} = {_shown(getattr(settings, key))}")

    def do_model(self, arg: str) -> None:
        models = self.session.client.list_models()
        if not arg:
            current = self.session.settings.model_name
            others = ", ".join(m if m != current else f"{m} (current)" for m in models) or "none listed"
            self.say(f"model: {current}; on the server: {others}")
            return
        if models and arg not in models:
            raise KubrickError(f"the server has no model {arg!r}; it has: {', '.join(models)}")
        self.session.settings.model_name = arg
        self.session.client.model_name = arg
        self.say(f"Model: {arg}.")

    def do_retry(self, arg: str) -> None:
        self.ask_again()

    def do_save(self, arg: str) -> None:
        if arg:
            self.session.conversation.name = arg
        path = self.session.store.save(self.session.conversation)
        self.say(f"Saved to {path}" + (f" as {arg!r}." if arg else "."))

    def do_load(self, arg: str) -> None:
        if not arg:
            raise KubrickError("/load needs a conversation id, name or path (see /list)")
        conversation = self.session.store.load(arg)
        self.session.conversation = conversation
        self.say(f"Loaded {conversation.id} ({len(conversation.messages)} messages): {conversation.title()}")
        for message in conversation.messages[-4:]:
            who = "you" if message["role"] == "user" else "model"
            text = " ".join(message["content"].split())
            self.say(f"  {who}: {text[:100]}{'…' if len(text) > 100 else ''}")

    def do_list(self, arg: str) -> None:
        conversations = self.session.store.recent(20)
        if not conversations:
            self.say("No saved conversations yet.")
            return
        table = Table(box=None, padding=(0, 2), header_style="dim")
        for column in ("id", "updated", "turns", "title"):
            table.add_column(column)
        for c in conversations:
            turns = sum(1 for m in c.messages if m["role"] == "user")
            marker = " *" if c.id == self.session.conversation.id else ""
            table.add_row(c.id + marker, c.updated.replace("T", " ").rstrip("Z"), str(turns), Text(c.title()))
        self.console.print(table)

    def do_stats(self, arg: str) -> None:
        session = self.session
        s = session.settings
        replies = [m for m in session.conversation.messages if m["role"] == "assistant"]
        tokens = sum(int(m.get("usage", {}).get("completion_tokens", 0)) for m in replies)
        prompt_tokens = max((int(m.get("usage", {}).get("prompt_tokens", 0)) for m in replies), default=0)
        self.say(f"server {s.triton_url} · model {s.model_name}")
        self.say(f"temperature {s.temperature} · top_p {s.top_p} · max_tokens {s.max_tokens} · seed {_shown(s.seed)} · "
                 f"reasoning {s.reasoning_effort}")
        self.say(f"{len(session.conversation.messages)} messages · {tokens} tokens generated · "
                 f"last prompt {prompt_tokens} tokens")
        if session.last is not None:
            self.say(f"last reply: {session.last.footer()}")
        self.say(f"saved in {session.store.path_for(session.conversation)}")


def _shown(value: object) -> str:
    """A setting as a person types it: an unset seed is `none`, as /set accepts it."""
    return "none" if value is None else str(value)


class SlashCompleter(Completer):
    """Completes command names after '/', and the fixed choices of /reasoning, /set and /load."""

    def __init__(self, session: ChatSession):
        self.session = session

    def _choices(self, command: str) -> Iterable[str]:
        if command == "/reasoning":
            return (*REASONING_EFFORTS, "show", "hide")
        if command == "/set":
            return SETTABLE
        if command == "/load":
            return [c.id for c in self.session.store.recent(20)]
        return ()

    def get_completions(self, document: Document, complete_event) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        if " " not in text:
            for command in COMMANDS:
                if command.name.startswith(text.lower()):
                    yield Completion(command.name, start_position=-len(text), display_meta=command.help)
            return
        command, _, rest = text.partition(" ")
        if " " in rest:
            return
        for choice in self._choices(command.lower()):
            if choice.startswith(rest):
                yield Completion(choice, start_position=-len(rest))
