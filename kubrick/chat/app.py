"""`kubrick` (the chat command): settle the settings, check the server, then run the REPL or answer once."""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass

from kubrick.errors import KubrickError


@dataclass
class ChatOptions:
    """The chat command's flags, as given (None = not given)."""

    prompt: str | None = None
    triton_url: str | None = None
    model_name: str | None = None
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    reasoning_effort: str | None = None
    hide_reasoning: bool = False
    json_output: bool = False
    load: str | None = None


def run_chat(options: ChatOptions) -> int:
    """Returns the exit code; expected failures raise KubrickError (printed as one line by the CLI)."""
    from kubrick.chat.session import ChatSession
    from kubrick.chat.store import ConversationStore
    from kubrick.client import TritonClient
    from kubrick.config import kubrick_home, resolve_settings

    settings = resolve_settings({
        "triton_url": options.triton_url,
        "model_name": options.model_name,
        "system_prompt": options.system,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "max_tokens": options.max_tokens,
        "seed": options.seed,
        "reasoning_effort": options.reasoning_effort,
        "hide_reasoning": True if options.hide_reasoning else None,
    })
    interactive = options.prompt is None and sys.stdin.isatty() and not options.json_output
    question = None if interactive else _question(options)

    store = ConversationStore(kubrick_home() / "conversations")
    conversation = store.load(options.load) if options.load else None
    if conversation is not None and options.system is not None:
        conversation.system = settings.system_prompt
    with TritonClient(settings.triton_url, settings.model_name) as client:
        client.check_health()
        session = ChatSession(settings, client, store, conversation)
        if interactive:
            from kubrick.chat.repl import run_repl

            client.check_model()  # a typo in the model name is better reported now than after the first question

            return run_repl(session)
        return _answer_once(session, question, options.json_output)


def _question(options: ChatOptions) -> str:
    if options.prompt is not None:
        # bytes that are not UTF-8 arrive as surrogates, which no JSON file or request can carry
        question = options.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    elif sys.stdin.isatty():
        raise KubrickError("--json needs a question: pass -p QUESTION or pipe it on stdin")
    else:
        question = sys.stdin.buffer.read().decode("utf-8", "replace")  # a Latin-1 file still gets asked
    if not question.strip():
        raise KubrickError("nothing to ask: the question is empty (pass -p QUESTION or pipe text on stdin)")
    return question.strip("\n")


def _answer_once(session, question: str, json_output: bool) -> int:
    from kubrick.chat.render import JsonRenderer, LiveRenderer, PlainRenderer

    if json_output:
        renderer = JsonRenderer()
    elif sys.stdout.isatty():
        from kubrick.chat.render import terminal_console

        renderer = LiveRenderer(terminal_console(), show_reasoning=not session.settings.hide_reasoning,
                                show_errors=False)
    else:
        renderer = PlainRenderer()
    try:
        result = session.ask(question, renderer)
    except OSError as err:
        if err.errno == errno.EPIPE:
            raise  # `kubrick -p … | head`: the reader left; click exits quietly
        raise KubrickError(f"cannot write the answer to stdout: {err.strerror or err}") from None
    if result.status == "cancelled":
        return 130
    if result.error is not None:
        raise result.error
    return 0
