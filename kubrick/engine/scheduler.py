"""The engine's request loop: one thread owns the engine and serves requests from a FIFO queue.

Callers `submit()` a request and get a `RequestHandle`; the request's events arrive through the callback given
at submit time, on the engine thread, and every request ends with exactly one terminal event: a `Finished` or
an `EngineError` (an `InvalidRequest` for a bad request). Cancelling a handle stops a running request before its
next decode step and drops a waiting one. Today one request runs at a time; continuous batching (a later issue)
replaces `_run_one` with a step loop over many requests while `submit`/`RequestHandle` stay as they are.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from kubrick.engine.api import (
    CancelToken,
    EngineError,
    EngineLike,
    Event,
    Finished,
    Message,
    SamplingParams,
    Usage,
)

log = logging.getLogger(__name__)

Outcome = Union[Event, EngineError]
EventCallback = Callable[[Outcome], None]

SHUTTING_DOWN = "the server is shutting down; send the request again once it is back"


@dataclass
class RequestHandle:
    """One submitted request: its cancel token and the moments the adapter turns into metrics."""

    id: int
    messages: list[Message]
    params: SamplingParams
    on_event: EventCallback
    cancel_token: CancelToken = field(default_factory=CancelToken)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    def cancel(self) -> None:
        """Stop this request: before its next decode step if running, before it starts if waiting."""
        self.cancel_token.cancel()

    @property
    def cancelled(self) -> bool:
        return self.cancel_token.cancelled

    @property
    def done(self) -> bool:
        return self.finished_at is not None


class Scheduler:
    """Owns the engine on one thread; requests wait in arrival order."""

    def __init__(self, engine: EngineLike, name: str = "kubrick-engine"):
        self.engine = engine
        self._waiting: deque[RequestHandle] = deque()
        self._running: RequestHandle | None = None
        self._lock = threading.Condition()
        self._stopping = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests queued and not yet started."""
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests the engine is generating for right now."""
        with self._lock:
            return 0 if self._running is None else 1

    def submit(self, messages: list[Message], params: SamplingParams, on_event: EventCallback) -> RequestHandle:
        """Queue a request; its events go to `on_event` (called on the engine thread, must not block long)."""
        handle = RequestHandle(id=next(self._ids), messages=messages, params=params, on_event=on_event)
        with self._lock:
            if self._stopping:
                stopped = True
            else:
                stopped = False
                self._waiting.append(handle)
                self._lock.notify()
        if stopped:
            self._finish(handle, EngineError(SHUTTING_DOWN))
        return handle

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything, end each request with an error event, and wait for the engine thread to exit."""
        with self._lock:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel()
            self._lock.notify_all()
        for handle in dropped:
            self._finish(handle, EngineError(SHUTTING_DOWN))
        self._thread.join(timeout)

    def _next(self) -> RequestHandle | None:
        with self._lock:
            while not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _loop(self) -> None:
        while (handle := self._next()) is not None:
            try:
                self._run_one(handle)
            finally:
                with self._lock:
                    if self._running is handle:
                        self._running = None

    def _run_one(self, handle: RequestHandle) -> None:
        handle.started_at = time.monotonic()
        if handle.cancelled:  # cancelled while it waited: the engine never sees it
            self._finish(handle, Finished(Usage(0, 0, 0.0, 0.0), reason="cancelled"))
            return
        try:
            for event in self.engine.generate(handle.messages, handle.params, handle.cancel_token):
                if isinstance(event, Finished):
                    if event.reason == "cancelled" and self._stopping:
                        self._finish(handle, EngineError(SHUTTING_DOWN))
                    else:
                        self._finish(handle, event)
                    return
                if handle.first_token_at is None:
                    handle.first_token_at = time.monotonic()
                self._deliver(handle, event)
            self._finish(handle, EngineError("the engine stopped without finishing the reply; this is a bug"))
        except EngineError as err:  # InvalidRequest included: worded for a person already
            self._finish(handle, err)
        except Exception as err:  # the engine broke on this request; keep serving the others
            log.exception("engine failed on request %d", handle.id)
            self._finish(handle, EngineError(f"the engine failed on this request ({type(err).__name__}: {err})"))

    def _finish(self, handle: RequestHandle, outcome: Outcome) -> None:
        if handle.done:
            return
        handle.finished_at = time.monotonic()
        with self._lock:  # counts are right by the time the listener sees the last event
            if self._running is handle:
                self._running = None
        self._deliver(handle, outcome)

    @staticmethod
    def _deliver(handle: RequestHandle, outcome: Outcome) -> None:
        try:
            handle.on_event(outcome)
        except Exception:  # a broken listener must not take the engine down
            log.exception("event callback failed for request %d", handle.id)
