"""A scripted stand-in for Triton's HTTP front end, for client tests: a real HTTP server on 127.0.0.1.

It answers /v2/health/live, /v2/repository/index and /v2/models/{model}/generate_stream. Each model is a
function from the request body to "frames": bytes are written (each as its own HTTP chunk, flushed),
floats are pauses in seconds, and DROP closes the socket abruptly. It records every request and notices
when a client disconnects mid-stream. It is not Triton: tests that need the real server start tritonserver.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

DROP = object()  # frame: close the connection without ending the HTTP response
Frames = Iterable[Any]
Script = Callable[[dict], Frames]


def sse(payload: Any, wrap: bool = True, model: str = "llm_decoupled") -> bytes:
    """One SSE event. wrap=True puts the JSON event in Triton's text_output like the real server does."""
    if wrap:
        inner = payload if isinstance(payload, str) else json.dumps(payload)
        payload = {"model_name": model, "model_version": "1", "text_output": inner}
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chat_reply(answer: str, reasoning: str = "", pieces: int = 3, pause: float = 0.0) -> list[Any]:
    """Frames of a normal reply in Triton's wrapped form: reasoning, answer in a few chunks, complete."""
    frames: list[Any] = []
    if reasoning:
        frames.append(sse({"type": "reasoning", "content": reasoning}))
    step = max(1, -(-len(answer) // pieces))
    for start in range(0, len(answer), step):
        frames.append(sse({"type": "chunk", "content": answer[start : start + step]}))
        if pause:
            frames.append(pause)
    usage = {"prompt_tokens": 12, "completion_tokens": pieces, "time_to_first_token_s": 0.01, "tokens_per_s": 100.0}
    frames.append(sse({"type": "complete", "usage": usage}))
    return frames


class ScriptedTriton:
    """Start with `with ScriptedTriton({"model": script}) as server:`; server.url is http://127.0.0.1:PORT."""

    def __init__(self, models: dict[str, Script], unknown_model_status: int = 400, live: bool = True):
        self.models = dict(models)
        self.unknown_model_status = unknown_model_status
        self.live = live
        self.requests: list[dict] = []
        self.disconnected = threading.Event()  # a client went away before its stream ended
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.handle_error = _quiet_about_disconnects
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "ScriptedTriton":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _quiet_about_disconnects(request: object, address: object) -> None:
    """Clients closing idle keep-alive connections are normal here; anything else is printed as usual."""
    import sys
    import traceback

    if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
        traceback.print_exc()


def _peer_closed(sock: socket.socket) -> bool:
    """True when the client has closed its side (readable with nothing to read)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _handler_for(owner: ScriptedTriton) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _json(self, status: int, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return {}

        def do_GET(self) -> None:
            if self.path == "/v2/health/live":
                self._json(200 if owner.live else 503, {})
            else:
                self._json(404, {"error": "Not Found"})

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/v2/repository/index":
                self._json(200, [{"name": n, "version": "1", "state": "READY"} for n in owner.models])
                return
            parts = self.path.strip("/").split("/")
            if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "generate_stream":
                owner.requests.append({"model": parts[2], **body})
                script = owner.models.get(parts[2])
                if script is None:
                    status = owner.unknown_model_status
                    self._json(status, {"error": f"Request for unknown model: '{parts[2]}' is not found"})
                    return
                self._stream(script(body))
                return
            self._json(404, {"error": "Not Found"})

        def _stream(self, frames: Frames) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            try:
                for frame in frames:
                    if _peer_closed(self.connection):
                        owner.disconnected.set()
                        return
                    if frame is DROP:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if isinstance(frame, (int, float)):  # pause, noticing a client that leaves meanwhile
                        until = time.monotonic() + frame
                        while time.monotonic() < until:
                            if _peer_closed(self.connection):
                                owner.disconnected.set()
                                return
                            time.sleep(min(0.02, max(0.0, until - time.monotonic())))
                        continue
                    if not frame:  # an empty chunk would end the HTTP body
                        continue
                    self.wfile.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                owner.disconnected.set()
                self.close_connection = True

    return Handler
