"""The Triton client: health check, model list and the streaming chat request (SSE over httpx + httpx-sse).

Servers speak several dialects of the same stream; `parse_event` turns each SSE `data:` payload into one of
Chunk, Reasoning, Complete (or raises ServerError) and ignores what it does not know. Failures become
KubrickErrors worded for a person.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
from httpx_sse import EventSource, SSEError

from kubrick.errors import KubrickError

CONNECT_TIMEOUT_S = 3.0  # an unreachable server is reported within seconds
READ_TIMEOUT_S = 600.0  # a long prefill may keep the stream silent for a while


@dataclass(frozen=True)
class Chunk:
    """Answer text (the model's final channel)."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """Reasoning text (the model's analysis channel)."""

    text: str


@dataclass(frozen=True)
class Complete:
    """The server finished the reply; usage as the server reported it (may be empty), and why it stopped
    ("stop", "length" = max_tokens or context reached, or "" when not said)."""

    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = ""


StreamEvent = Chunk | Reasoning | Complete


class ServerUnreachable(KubrickError):
    pass


class UnknownModel(KubrickError):
    pass


class ServerError(KubrickError):
    """The server reported an error for this request (an error event, or an HTTP error status)."""


class StreamCutOff(KubrickError):
    """The stream ended before the server said the reply was complete."""


_DONE = "[DONE]"


def parse_event(data: str) -> StreamEvent | None:
    """One SSE data payload -> an event; None for keep-alives and types we don't know. Raises ServerError."""
    if data.strip() == _DONE:
        return Complete()
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return Chunk(data) if data else None  # a server streaming bare text
    if not isinstance(obj, dict):
        return None
    if "text_output" in obj:  # Triton's generate extension wraps the model's output
        return _parse_model_output(obj["text_output"])
    if isinstance(obj.get("outputs"), list):  # tensor form: {"outputs":[{"data":["…"]}]}
        for output in obj["outputs"]:
            if isinstance(output, dict) and output.get("data"):
                return _parse_model_output(output["data"])
        return None
    if "type" in obj:
        return _parse_typed(obj)
    if "error" in obj:  # Triton reports failures after the stream started as {"error": "…"} under HTTP 200
        raise ServerError(f"the server reported an error: {_error_text(obj['error'])}")
    return None


def _parse_model_output(value: Any) -> StreamEvent | None:
    """A model's text_output: a JSON event string, or plain answer text."""
    if isinstance(value, list):
        value = value[0] if value else ""
    if not isinstance(value, str):
        return None
    try:
        inner = json.loads(value)
    except json.JSONDecodeError:
        inner = None
    if isinstance(inner, dict) and "type" in inner:
        return _parse_typed(inner)
    return Chunk(value) if value else None


def _parse_typed(obj: dict[str, Any]) -> StreamEvent | None:
    kind = obj.get("type")
    content = obj.get("content")
    if kind == "chunk":
        return Chunk(content) if isinstance(content, str) and content else None
    if kind == "reasoning":
        return Reasoning(content) if isinstance(content, str) and content else None
    if kind == "complete":
        usage = obj.get("usage")
        reason = obj.get("finish_reason")
        return Complete(usage if isinstance(usage, dict) else {}, reason if isinstance(reason, str) else "")
    if kind == "error":
        raise ServerError(f"the server reported an error: {_error_text(content or obj.get('error') or obj.get('message'))}")
    return None  # unknown types are for newer clients


def _error_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return " ".join(text.split()) or "(no details)"


class TritonClient:
    """Talks to one Triton server about one model. Use as a context manager, or call close()."""

    def __init__(self, url: str, model_name: str, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.model_name = model_name
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=connect_timeout, pool=connect_timeout)
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _unreachable(self, err: Exception) -> ServerUnreachable:
        reason = type(err).__name__ if not str(err) else str(err)
        return ServerUnreachable(
            f"cannot reach a Triton server at {self.url} ({reason}); start one with `kubrick serve` "
            "or point --triton-url / TRITON_URL at a running server"
        )

    def check_health(self) -> None:
        """GET /v2/health/live; raises ServerUnreachable if nobody answers or the server is not live."""
        try:
            response = self._http.get("/v2/health/live", timeout=httpx.Timeout(CONNECT_TIMEOUT_S))
        except httpx.RemoteProtocolError as err:  # something listens, but not an HTTP/1.1 server (gRPC, say)
            raise ServerUnreachable(
                f"the server at {self.url} does not answer HTTP ({err}); is that Triton's gRPC port? "
                "use its HTTP port (8000 unless `kubrick serve --http-port` moved it)"
            ) from None
        except httpx.TransportError as err:
            raise self._unreachable(err) from None
        if response.status_code != 200:
            raise ServerUnreachable(
                f"the server at {self.url} is not live (GET /v2/health/live answered HTTP {response.status_code}); "
                "is it a Triton server? start one with `kubrick serve`"
            )

    def list_models(self) -> list[str]:
        """Names of the models the server can serve now (POST /v2/repository/index, READY ones)."""
        try:
            response = self._http.post("/v2/repository/index", json={"ready": True})
        except httpx.TransportError as err:
            raise self._unreachable(err) from None
        if response.status_code != 200:
            return []
        try:
            entries = response.json()
        except ValueError:
            return []
        names = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("name") and entry.get("state", "READY") == "READY":
                if entry["name"] not in names:
                    names.append(entry["name"])
        return names

    def check_model(self) -> None:
        """Raise UnknownModel if the server lists its models and ours is not among them."""
        models = self.list_models()
        if models and self.model_name not in models:
            raise self._unknown_model(models)

    def _unknown_model(self, models: list[str]) -> UnknownModel:
        available = ", ".join(models) if models else "none"
        return UnknownModel(
            f"the server at {self.url} has no model named {self.model_name!r} "
            f"(models there: {available}); choose one with --model-name"
        )

    def generate_stream(self, messages: list[dict[str, str]], parameters: dict[str, Any]) -> Iterator[StreamEvent]:
        """Stream one reply: yields Chunk/Reasoning and finally Complete.

        Raises ServerError (an error event or status), UnknownModel, ServerUnreachable, or StreamCutOff when the
        stream ends without `complete`. Closing the generator early closes the HTTP stream, which makes the
        server cancel the generation.
        """
        body = {"text_input": json.dumps(messages), "parameters": {**parameters, "streaming": True}}
        path = f"/v2/models/{self.model_name}/generate_stream"
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        try:
            with self._http.stream("POST", path, json=body, headers=headers) as response:
                if response.status_code != 200:
                    response.read()
                    raise self._status_error(response)
                response.encoding = "utf-8"  # SSE is always UTF-8; the incremental decoder keeps split characters whole
                for sse in EventSource(response).iter_sse():
                    if not sse.data:
                        continue
                    event = parse_event(sse.data)
                    if event is None:
                        continue
                    yield event
                    if isinstance(event, Complete):
                        return
        except httpx.ConnectError as err:
            raise self._unreachable(err) from None
        except SSEError as err:
            raise ServerError(f"the server at {self.url} did not answer with an event stream ({err})") from None
        except httpx.TimeoutException:
            raise StreamCutOff(f"the server at {self.url} stopped sending; the answer was cut off") from None
        except httpx.TransportError as err:
            raise StreamCutOff(f"the connection to {self.url} broke ({err or type(err).__name__}); the answer was cut off") from None
        raise StreamCutOff("the stream ended before the server finished; the answer was cut off")

    def _status_error(self, response: httpx.Response) -> KubrickError:
        try:
            detail = _error_text(response.json().get("error", response.text))
        except (ValueError, AttributeError):
            detail = _error_text(response.text)
        if response.status_code in (400, 404):
            models = self.list_models()
            if self.model_name not in models:
                return self._unknown_model(models)
        if response.status_code in (405, 501):  # e.g. Triton's metrics port, which answers GET but not POST
            return ServerError(
                f"the server at {self.url} does not take generate_stream requests (HTTP {response.status_code}: "
                f"{detail}); is that Triton's HTTP port? `kubrick serve` prints the URL to use"
            )
        return ServerError(f"the server refused the request (HTTP {response.status_code}): {detail}")
