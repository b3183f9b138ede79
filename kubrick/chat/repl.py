"""The interactive chat loop (prompt_toolkit): read a line, run a slash command or ask the model, repeat.

Enter sends, Alt+Enter / Esc Enter adds a line, pasted text keeps its newlines, history persists under
~/.kubrick/history (Ctrl-R searches it). Ctrl-C stops a streaming reply, or clears the line; at an empty
prompt Ctrl-C twice (or Ctrl-D once) exits.
"""

from __future__ import annotations

from prompt_toolkit import PromptSession
from prompt_toolkit.filters import is_searching
from prompt_toolkit.formatted_text import HTML
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings

from kubrick import __version__
from kubrick.chat.commands import EXIT, SlashCommands, SlashCompleter
from kubrick.chat.render import LiveRenderer, terminal_console
from kubrick.chat.session import ChatSession, TurnResult
from kubrick.config import kubrick_home

PROMPT = HTML("<ansicyan><b>› </b></ansicyan>")


def _key_bindings(state: dict) -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("enter", filter=~is_searching)  # while Ctrl-R searches, Enter accepts the found line
    def _send(event) -> None:
        event.current_buffer.validate_and_handle()

    @bindings.add("escape", "enter")  # Alt+Enter arrives as Esc then Enter
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    @bindings.add("c-c")
    def _interrupt(event) -> None:
        state["empty_interrupt"] = not event.current_buffer.text
        event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return bindings


def run_repl(session: ChatSession) -> int:
    console = terminal_console()
    home = kubrick_home()
    home.mkdir(parents=True, exist_ok=True)
    state = {"empty_interrupt": False}
    prompt = PromptSession(
        history=FileHistory(str(home / "history")),
        completer=SlashCompleter(session),
        complete_while_typing=True,
        key_bindings=_key_bindings(state),
        multiline=True,
        prompt_continuation="  ",
        enable_history_search=False,  # Up walks history; Ctrl-R searches it
    )

    def show_reply(result: TurnResult) -> None:
        console.print(result.footer(), style="dim", highlight=False)
        console.print()

    def ask(text: str | None) -> None:
        renderer = LiveRenderer(console, show_reasoning=not session.settings.hide_reasoning)
        console.print()
        result = session.retry(renderer) if text is None else session.ask(text, renderer)
        if result.status == "cancelled":
            console.print("(stopped; the partial reply is kept)", style="yellow", highlight=False)
        show_reply(result)

    commands = SlashCommands(session, console, ask_again=lambda: ask(None))
    settings = session.settings
    console.print(
        f"kubrick {__version__} · {settings.model_name} at {settings.triton_url} · "
        "/help for commands · Ctrl-D to exit",
        style="dim", highlight=False,
    )
    if session.conversation.messages:
        commands.handle(f"/load {session.store.path_for(session.conversation)}")

    interrupted_once = False
    while True:
        state["empty_interrupt"] = True  # a Ctrl-C between two prompts counts as one at an empty prompt
        try:
            text = prompt.prompt(PROMPT)
        except KeyboardInterrupt:
            if state["empty_interrupt"]:
                if interrupted_once:
                    return 0
                console.print("(press Ctrl-C again or Ctrl-D to exit)", style="dim", highlight=False)
                interrupted_once = True
            continue
        except EOFError:
            return 0
        interrupted_once = False
        if not text.strip():
            continue
        if text.lstrip().startswith("/"):
            if commands.handle(text.strip()) == EXIT:
                return 0
            continue
        try:
            ask(text)
        except KeyboardInterrupt:  # a second Ctrl-C while the reply was being wrapped up
            console.print("(stopped)", style="yellow", highlight=False)
