"""The engine's public contract, shared by the Triton model, the scheduler and the tests.

Only the standard library here: the Triton adapter and the CLI can import these types without torch.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Union

REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("system", "developer", "user", "assistant")


class EngineError(Exception):
    """Any failure of the engine, worded for a person."""


class InvalidRequest(EngineError):
    """The request itself is wrong (bad messages, bad parameters, prompt too long); the server stays up."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings for one request; `parse_params()` builds them from a request with one clear error."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    max_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] = ()
    reasoning_effort: str = "medium"


@dataclass(frozen=True)
class ReasoningDelta:
    """Text of the analysis channel (the model thinking)."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """Text of the final channel (the answer)."""

    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    tokens_per_s: float


@dataclass(frozen=True)
class Finished:
    """Last event of every generation. reason: 'stop' (end of message or stop string), 'length' (max_tokens
    or context full) or 'cancelled'."""

    usage: Usage
    reason: str


Event = Union[ReasoningDelta, ContentDelta, Finished]


class CancelToken:
    """Set from any thread; the engine checks it before every decode step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class EngineLike(Protocol):
    """What the Triton model and the scheduler rely on."""

    context_length: int

    def generate(
        self, messages: list[Message], params: SamplingParams, cancel: CancelToken | None = None
    ) -> Iterator[Event]: ...


def parse_messages(value: object) -> list[Message]:
    """Turn a request's messages (a JSON string or an already-decoded list) into Messages, or say what is wrong."""
    import json

    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidRequest(
                f"text_input is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                'send a JSON list of {"role", "content"} messages'
            ) from None
    if not isinstance(value, list):
        raise InvalidRequest('text_input must be a JSON list of {"role", "content"} messages')
    if not value:
        raise InvalidRequest("text_input holds no messages; send at least one user message")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f'message {i} is not an object; each message needs "role" and "content"')
        role, content = item.get("role"), item.get("content")
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise InvalidRequest(f'message {i} has no "{missing}"; each message needs "role" and "content"')
        if role not in ROLES:
            raise InvalidRequest(f"message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequest(f'message {i}: "content" must be a string')
        try:  # JSON can spell a lone UTF-16 surrogate ("\udce9"); it is not text, and the chat format refuses it
            content.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = ord(content[err.start])
            raise InvalidRequest(
                f'message {i}: "content" holds a lone surrogate (\\u{bad:04x}), which is not text; send valid Unicode'
            ) from None
        messages.append(Message(role=role, content=content))
    return messages


def _number(name: str, value: object, kind: type) -> float | int:
    """A number from JSON or a Triton parameter (which may arrive as a string), or a clear error."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a number, not {value!r}")
    if isinstance(value, str):
        try:
            value = kind(value) if kind is int else float(value)
        except ValueError:
            raise InvalidRequest(f"{name} must be a number, not {value!r}") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise InvalidRequest(f"{name} must be a whole number, not {value!r}")
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, not {value!r}")
    return float(value)


def parse_params(raw: dict | None, defaults: SamplingParams = SamplingParams()) -> SamplingParams:
    """Validate request parameters (unknown keys such as `streaming` are ignored) into SamplingParams."""
    raw = dict(raw or {})
    values: dict = {}
    if raw.get("temperature") is not None:
        values["temperature"] = _number("temperature", raw["temperature"], float)
        if values["temperature"] < 0:
            raise InvalidRequest(f"temperature must be 0 or more (0 = greedy), not {values['temperature']}")
    if raw.get("top_p") is not None:
        values["top_p"] = _number("top_p", raw["top_p"], float)
        if not 0 < values["top_p"] <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], not {values['top_p']}")
    if raw.get("top_k") is not None:
        values["top_k"] = _number("top_k", raw["top_k"], int)
        if values["top_k"] < 0:
            raise InvalidRequest(f"top_k must be 0 (off) or more, not {values['top_k']}")
    max_tokens = raw.get("max_tokens", raw.get("max_new_tokens"))
    if max_tokens is not None:
        values["max_tokens"] = _number("max_tokens", max_tokens, int)
        if values["max_tokens"] < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, not {values['max_tokens']}")
    if raw.get("seed") is not None:
        values["seed"] = _number("seed", raw["seed"], int)
    if raw.get("stop") is not None:
        stop = raw["stop"]
        if isinstance(stop, str):
            import json

            try:  # Triton parameters are scalars: a list of stops arrives as a JSON string
                decoded = json.loads(stop)
                stop = decoded if isinstance(decoded, list) else [stop]
            except json.JSONDecodeError:
                stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest("stop must be a string or a list of non-empty strings")
        values["stop"] = tuple(stop)
    if raw.get("reasoning_effort") is not None:
        effort = str(raw["reasoning_effort"]).lower()
        if effort not in REASONING_EFFORTS:
            raise InvalidRequest(f"reasoning_effort must be low, medium or high, not {raw['reasoning_effort']!r}")
        values["reasoning_effort"] = effort
    from dataclasses import replace

    return replace(defaults, **values)
