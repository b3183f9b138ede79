"""The engine in a process of its own, beside the Triton model's stub process.

Why: in one process the engine thread and the thread sending responses share one GIL. Every response is a round
trip to the server that gives the GIL up and has to take it back from the engine thread's Python; at 64 streams
that is ~9,000 sends a second, and the two threads slowed each other (BENCHMARKS.md run 43). In two processes the
engine thread runs alone, and what crosses between them is one message a step (every stream's text of that step).

The Triton model's side is `EngineProcess`: start it (it answers once the engine is loaded, or with the error that
stopped it), `submit` and `cancel` requests by id, and take the engine's events from `on_events`, called on a
thread of its own with lists of `(request id, outcome, timing)`. The process's side is `main()`: it loads the
engine, runs the scheduler, and sends what the scheduler delivers, drained in one message whenever the engine
thread lets go of the GIL (it does at the end of every step, waiting for the GPU).

Messages, each a pickled tuple on one socket pair:
  model -> engine: ("submit", id, messages, params), ("cancel", id), ("stop",)
  engine -> model: ("ready", info), ("failed", message), ("events", [(id, outcome, timing)]),
                   ("gauges", running, waiting, kv_cache_usage), ("stopped",)
An outcome is a ReasoningDelta, ContentDelta or Finished, or an EngineError / InvalidRequest; timing is None but
for a request's last event: (seconds to its first text or None, seconds per token after the first or None).
Only the standard library on the model's side: the stub process never imports torch.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from kubrick.engine.api import (
    ContentDelta,
    EngineError,
    InvalidRequest,
    Message,
    ReasoningDelta,
    SamplingParams,
)

GAUGES_EVERY_S = 0.05  # how often the engine process looks at its running/waiting/KV-cache figures
STOP_TIMEOUT_S = 30.0  # how long stop() waits for the engine to end its requests and exit

log = logging.getLogger(__name__)

EventsCallback = Callable[[list], None]


class EngineProcess:
    """The model's handle on the engine process (see the module's docstring)."""

    def __init__(self, process: subprocess.Popen, conn: Connection, info: dict):
        self.process = process
        self.info = info  # version, device, context_length, kv_cache (a description), from the engine
        self.gauges = (0, 0, 0.0)  # running, waiting, KV-cache usage: the latest the engine sent
        self._conn = conn
        self._send_lock = threading.Lock()  # execute() submits, the response thread cancels
        self._exited: str | None = None  # why the engine process is gone, once it is
        self._receiver: threading.Thread | None = None

    @classmethod
    def start(cls, settings: dict) -> EngineProcess:
        """Start the engine process and wait until its engine is loaded. settings: checkpoint, device,
        context_length (None for the engine's defaults). EngineError with the engine's own message if it
        cannot start."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        package_root = Path(__file__).resolve().parents[2]  # the folder holding `kubrick`
        if package_root.name not in ("site-packages", "dist-packages"):  # a source tree: import this very kubrick
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root), env.get("PYTHONPATH")) if p)
        try:
            process = subprocess.Popen(
                [python_executable(), "-m", "kubrick.server.engine_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        conn.send(("settings", settings))
        try:
            first = conn.recv()
        except (EOFError, OSError):
            first = ("failed", f"the engine process exited while loading (exit code {process.wait()})")
        if first[0] != "ready":
            conn.close()
            _reap(process)
            raise EngineError(first[1])
        return cls(process, conn, first[1])

    def listen(self, on_events: EventsCallback, on_exit: Callable[[str], None]) -> None:
        """Start taking the engine's messages: event lists go to on_events, and on_exit(reason) is called once
        if the engine process ends before stop() (its requests will get no more events; reason: "the engine
        process exited (exit code N)")."""
        self._receiver = threading.Thread(target=self._receive, args=(on_events, on_exit),
                                          name="kubrick-engine-link", daemon=True)
        self._receiver.start()

    def submit(self, request_id: int, messages: list[Message], params: SamplingParams) -> None:
        self._send(("submit", request_id, messages, params))

    def cancel(self, request_id: int) -> None:
        self._send(("cancel", request_id))

    @property
    def exited(self) -> str | None:
        """Why the engine process is gone (a sentence for the clients), or None while it runs."""
        return self._exited

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """End every request (each gets its last event through on_events) and wait for the process to exit."""
        try:
            self._send(("stop",))
        except EngineError:
            pass  # already gone
        if self._receiver is not None:
            self._receiver.join(timeout)
        _reap(self.process, timeout)
        self._conn.close()

    def _send(self, message: tuple) -> None:
        if not self._exited:
            try:
                with self._send_lock:
                    self._conn.send(message)
                return
            except OSError:
                pass  # the process died: its exit is being reported
        self._wait_for_exit_report()
        raise EngineError(self._exited or "the engine process is gone")

    def _wait_for_exit_report(self, timeout: float = 10.0) -> None:
        """Let the receiver finish reporting the exit, so that on_exit has run (the model words its errors there)
        before a sender sees the reason."""
        if self._receiver is not None and self._receiver is not threading.current_thread():
            self._receiver.join(timeout)

    def _receive(self, on_events: EventsCallback, on_exit: Callable[[str], None]) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                code = self.process.wait()
                self._exited = f"the engine process exited (exit code {code})"
                on_exit(self._exited)
                return
            kind = message[0]
            if kind == "events":
                on_events(message[1])
            elif kind == "gauges":
                self.gauges = message[1:]
            elif kind == "stopped":
                self._exited = "the server is shutting down; send the request again once it is back"
                return


def python_executable() -> str:
    """The interpreter for the engine process: this one. Inside Triton's stub (which embeds Python) sys.executable
    may name the stub; the stub found its Python as `python3` on PATH, so that is the one."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or "python3"


def _reap(process: subprocess.Popen, timeout: float = 5.0) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the engine process ------------------------------------------------------------------------------------------


def _portable(outcome: object) -> object:
    """An outcome that unpickles on the model's side: errors become EngineError or InvalidRequest, same words."""
    if isinstance(outcome, InvalidRequest):
        return InvalidRequest(str(outcome))
    if isinstance(outcome, Exception):
        return EngineError(str(outcome))
    return outcome


def _timing(handle) -> tuple[float | None, float | None]:
    """(time to first text, time per token after the first) of a finished request, for the model's metrics."""
    if handle.first_token_at is None:
        return None, None
    ttft = handle.first_token_at - handle.submitted_at
    tokens = handle.generated_tokens
    tpot = None
    if tokens > 1 and handle.finished_at is not None:
        tpot = (handle.finished_at - handle.first_token_at) / (tokens - 1)
    return ttft, tpot


class _Outgoing:
    """The scheduler's events, sent on by a thread of their own: it wakes at the first event of a step, but gets
    the GIL only when the engine thread waits for the GPU (or after the interpreter's switch interval), so one
    message carries a whole step's events."""

    def __init__(self, conn: Connection, engine, scheduler_ref: list):
        self.conn = conn
        self.engine = engine
        self.scheduler_ref = scheduler_ref  # [scheduler] once made (the callbacks exist before it)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="kubrick-engine-outgoing", daemon=True)
        self.thread.start()

    def put(self, item: tuple) -> None:
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(STOP_TIMEOUT_S)

    def _loop(self) -> None:
        gauges, gauges_at = None, 0.0
        while True:
            try:
                first = self.queue.get(timeout=GAUGES_EVERY_S)
                items = [first]
                while True:
                    try:
                        items.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
            except queue.Empty:
                items = []
            closing = None in items
            events = [item for item in items if item is not None]
            try:
                if events:
                    self.conn.send(("events", events))
                now = time.monotonic()
                if now - gauges_at >= GAUGES_EVERY_S and self.scheduler_ref:
                    gauges_at = now
                    latest = self._gauges()
                    if latest != gauges:
                        gauges = latest
                        self.conn.send(("gauges", *latest))
            except OSError:  # the model's side is gone: nobody to tell
                return
            if closing:
                return

    def _gauges(self) -> tuple[int, int, float]:
        scheduler = self.scheduler_ref[0]
        return scheduler.running, scheduler.waiting, round(float(self.engine.kv_cache_usage()), 4)


def main(fd: int) -> int:
    """The engine process: load the engine, then serve the model's messages until it says stop or goes away."""
    logging.basicConfig(level=logging.WARNING, format="kubrick engine: %(levelname)s %(message)s")
    conn = Connection(fd)
    try:
        _, settings = conn.recv()
    except (EOFError, OSError):
        return 1
    try:
        from kubrick.engine.engine import Engine
        from kubrick.engine.scheduler import Scheduler

        engine = Engine.from_env(**settings)
    except EngineError as err:  # a checkpoint, config or vocabulary a person can fix: their words, no traceback
        conn.send(("failed", str(err)))
        return 1
    except Exception as err:  # a bug or the machine (CUDA out of memory …): its type says which
        log.exception("the engine failed to load")
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return 1
    scheduler_ref: list = []
    outgoing = _Outgoing(conn, engine, scheduler_ref)
    scheduler = Scheduler(engine)
    conn.send(("ready", {
        "version": str(getattr(engine, "version", "unknown")),
        "device": str(engine.device),
        "context_length": engine.context_length,
        "kv_cache": engine.kv_cache_description(),
    }))
    scheduler_ref.append(scheduler)  # from now on the outgoing thread sends gauges: one sender at a time till here
    handles: dict[int, object] = {}

    def on_event(request_id: int, outcome: object) -> None:  # on the engine thread
        handle = handles.get(request_id)
        terminal = not isinstance(outcome, (ReasoningDelta, ContentDelta))
        timing = _timing(handle) if terminal and handle is not None else None
        if terminal:
            handles.pop(request_id, None)
        outgoing.put((request_id, _portable(outcome), timing))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the model's process is gone: nobody is waiting for anything
            os._exit(0)
        kind = message[0]
        if kind == "submit":
            _, request_id, messages, params = message
            handles[request_id] = None  # reserved: a fast request may end inside submit()
            handle = scheduler.submit(messages, params, on_event=lambda o, r=request_id: on_event(r, o))
            if request_id in handles:
                handles[request_id] = handle
        elif kind == "cancel":
            handle = handles.get(message[1])
            if handle is not None:
                handle.cancel()
        elif kind == "stop":
            scheduler.stop()
            outgoing.close()
            conn.send(("stopped",))
            return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
