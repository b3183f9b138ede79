"""One chat: the settings in force, the conversation so far, and sending a turn to the server.

Shared by the REPL and the one-shot modes. Every turn is saved to the store as it completes, is cut off,
or is stopped with Ctrl-C (the partial reply stays in the conversation).
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from kubrick.chat.render import Renderer, quiet_terminal
from kubrick.chat.store import Conversation, ConversationStore, _now
from kubrick.client import Chunk, Complete, Reasoning, StreamCutOff, TritonClient
from kubrick.config import Settings
from kubrick.errors import KubrickError


@dataclass
class TurnResult:
    status: str  # complete | cancelled | cut_off | error
    answer: str = ""
    reasoning: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = ""  # from the server: stop | length
    error: KubrickError | None = None
    time_to_first_token_s: float | None = None  # as the person saw it: until the first text arrived
    duration_s: float = 0.0
    pieces: int = 0  # streamed text events (answer and reasoning)
    first_piece_s: float | None = None
    last_piece_s: float | None = None

    @property
    def tokens(self) -> int:
        """Completion tokens as the server counted them, else the number of streamed pieces."""
        return int(self.usage.get("completion_tokens") or self.pieces)

    @property
    def tokens_per_s(self) -> float | None:
        """The server's own generation rate when it reported one; else streamed pieces over the time they took.

        Never the server's token count over the client's streaming time: a server may hold text back (the
        engine does until it knows the channel) and send many tokens in one burst, which would read as
        thousands of tokens a second.
        """
        rate = self.usage.get("tokens_per_s")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
            return float(rate)
        if self.pieces > 1 and self.first_piece_s is not None and self.last_piece_s is not None:
            span = self.last_piece_s - self.first_piece_s
            if span > 0:
                return (self.pieces - 1) / span
        return None

    def footer(self) -> str:
        """tokens · time to first token · tokens/s."""
        parts = [f"{self.tokens} token" + ("" if self.tokens == 1 else "s")]
        if self.time_to_first_token_s is not None:
            parts.append(f"first token {self.time_to_first_token_s:.2f} s")
        if self.tokens_per_s is not None and self.tokens > 1:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        if self.status != "complete":
            parts.append({"cancelled": "stopped", "cut_off": "cut off", "error": "failed"}[self.status])
        elif self.finish_reason == "length":
            parts.append("reached max_tokens or the context length")
        return " · ".join(parts)


class _DeferredInterrupt:
    """Ctrl-C lands between screen updates, never inside one (a half-drawn live area would stay on screen).

    Outside `drawing()` Ctrl-C raises KeyboardInterrupt at once (it can break a blocking read); inside, it is
    held until the drawing is done.
    """

    def __init__(self) -> None:
        self.drawing_now = False
        self.pending = False

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.drawing_now:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def drawing(self):
        self.drawing_now = True
        try:
            yield
        finally:
            self.drawing_now = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


class ChatSession:
    def __init__(self, settings: Settings, client: TritonClient, store: ConversationStore,
                 conversation: Conversation | None = None):
        self.settings = replace(settings)
        self.client = client
        self.store = store
        self.conversation = conversation or self._new_conversation()
        self.last: TurnResult | None = None

    def _new_conversation(self) -> Conversation:
        return Conversation(model=self.settings.model_name, system=self.settings.system_prompt)

    def new_conversation(self) -> None:
        self.conversation = self._new_conversation()

    def ask(self, text: str, renderer: Renderer) -> TurnResult:
        """Add the user's message, stream the reply into the renderer and the conversation, save."""
        self.conversation.messages.append({"role": "user", "content": text, "time": _now()})
        self.save()
        return self.reply(renderer)

    def retry(self, renderer: Renderer) -> TurnResult:
        """Drop the reply to the last user message and ask again."""
        messages = self.conversation.messages
        while messages and messages[-1]["role"] != "user":
            messages.pop()
        if not messages:
            raise KubrickError("nothing to retry yet; ask something first")
        return self.reply(renderer)

    def reply(self, renderer: Renderer) -> TurnResult:
        with quiet_terminal(), _DeferredInterrupt().installed() as guard:
            result = self._stream_reply(renderer, guard)
        self._record(result)
        self.last = result
        return result

    def _stream_reply(self, renderer: Renderer, guard: "_DeferredInterrupt") -> TurnResult:
        result = TurnResult(status="complete")
        started = time.monotonic()
        stream = self.client.generate_stream(self.conversation.wire_messages(), self.settings.generation_parameters())
        answer: list[str] = []  # joined once at the end: a long reply is not copied per token
        reasoning: list[str] = []
        try:
            with guard.drawing():
                renderer.start()
            for event in stream:
                if isinstance(event, (Chunk, Reasoning)):
                    result.last_piece_s = time.monotonic() - started
                    result.pieces += 1
                    if result.time_to_first_token_s is None:
                        result.time_to_first_token_s = result.first_piece_s = result.last_piece_s
                if isinstance(event, Chunk):
                    answer.append(event.text)
                    with guard.drawing():
                        renderer.answer(event.text)
                elif isinstance(event, Reasoning):
                    reasoning.append(event.text)
                    with guard.drawing():
                        renderer.reasoning(event.text)
                elif isinstance(event, Complete):
                    result.usage, result.finish_reason = event.usage, event.finish_reason
        except KeyboardInterrupt:
            result.status = "cancelled"
        except StreamCutOff as err:
            result.status, result.error = "cut_off", err
        except KubrickError as err:
            result.status, result.error = "error", err
        finally:
            stream.close()  # closes the HTTP stream: the server cancels the generation
            result.duration_s = time.monotonic() - started
            result.answer, result.reasoning = "".join(answer), "".join(reasoning)
        guard.drawing_now = True  # wrapping up: a late Ctrl-C must not tear the last screen update
        renderer.finish(result.usage if result.status == "complete" else None, result.finish_reason)
        if result.error is not None:
            renderer.error(str(result.error))
        return result

    def _record(self, result: TurnResult) -> None:
        if not (result.answer or result.reasoning):
            return  # nothing came back: the user's message stays, /retry sends it again
        message: dict[str, Any] = {"role": "assistant", "content": result.answer, "time": _now(),
                                   "status": result.status}
        if result.reasoning:
            message["reasoning"] = result.reasoning
        if result.usage:
            message["usage"] = result.usage
        if result.finish_reason:
            message["finish_reason"] = result.finish_reason
        self.conversation.messages.append(message)
        self.save()

    def save(self) -> None:
        self.conversation.model = self.settings.model_name
        self.store.save(self.conversation)
