"""An optional record of what the scheduler's thread does, to find where the gaps between tokens come from.

Set KUBRICK_STEP_TRACE to a file path and the engine thread appends one JSON line per event:
  {"ev": "launch", "t": start, "ms": host time, "kind": "decode" | "mixed" | "chained", "rows": n, "prefill": tokens}
  {"ev": "wait", "t": start, "ms": time blocked reading a step's picks back}
  {"ev": "deliver", "t": start, "ms": time streaming text, "n": tokens streamed}
  {"ev": "admit", "t": start, "ms": time checking, rendering and admitting new requests, "prepared": requests
      rendered and waiting, "running": requests in the batch after it} (only when it changed either)
  {"ev": "gc", "t": start, "ms": time, "generation": 0-2}: a pause of Python's cyclic garbage collector (every
      thread stops), from gc.callbacks
  {"ev": "compile", "t": start, "ms": time, "kernel": name}: Triton compiling (or loading from its disk cache)
      a kernel for arguments it has not seen in this process, in whatever step needed it
  {"ev": "respond", "t": start, "ms": time sending, "n": responses sent}: the Triton model's response thread
      taking what the engine delivered and sending it to the clients (written by the model's process, beside the
      engine process's events; perf_counter is one clock for both on Linux)
t is time.perf_counter() in seconds. Lines are buffered and written every 512 events and when the scheduler
stops, so tracing costs the engine thread a few microseconds an event. `scripts/step_trace.py FILE` summarises.
A path that cannot be written turns tracing off with one warning: a diagnostic must never fail a request.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class StepTrace:
    GC_PAUSE_S = 1e-3  # collector pauses shorter than this are many and harmless: not recorded

    def __init__(self, path: Path):
        self.path: Path | None = path  # None once writing failed: tracing is off
        self._events: list[dict] = []
        self._lock = threading.Lock()  # the engine thread and the server's response thread both add events
        self._hooks: tuple | None = None  # Triton's JIT hooks while this trace watches compiles
        self._gc_callback = None

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get("KUBRICK_STEP_TRACE")
        if not path:
            return None
        trace = cls(Path(path))
        trace._write([])  # fail now, at start, if the file cannot be opened
        if trace.path is None:
            return None
        trace._watch_compiles()
        trace._watch_gc()
        return trace

    def _watch_gc(self) -> None:
        """Record the collector's pauses of at least GC_PAUSE_S."""
        started = [0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            elif time.perf_counter() - started[0] >= self.GC_PAUSE_S:
                self.add("gc", started[0], generation=info["generation"])

        gc.callbacks.append(on_gc)
        self._gc_callback = on_gc

    def _watch_compiles(self) -> None:
        """Record Triton's compiles through its JIT hooks (process-wide; the last trace made owns them)."""
        try:
            from triton import knobs
        except ImportError:  # no Triton, no compiles to see
            return
        started: dict[str, float] = {}

        def before(*, key, fn, **_):
            started[key] = time.perf_counter()
            return None  # go on and compile

        def after(*, key, fn, **_):
            if key in started:
                self.add("compile", started.pop(key), kernel=fn.name)

        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
        self._hooks = (before, after)

    def close(self) -> None:
        """Write what is buffered and stop watching compiles and the collector (when the scheduler stops)."""
        if self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)
        self.flush()
        if self._hooks:
            from triton import knobs

            if (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == self._hooks:
                knobs.runtime.jit_cache_hook = knobs.runtime.jit_post_compile_hook = None
            self._hooks = None

    def add(self, ev: str, start: float, **fields) -> None:
        """One event that began at `start` (perf_counter) and ends now."""
        if self.path is None:
            return
        event = dict(ev=ev, t=round(start, 6), ms=round((time.perf_counter() - start) * 1e3, 3), **fields)
        with self._lock:
            self._events.append(event)
            full = len(self._events) >= 512
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            if events:
                self._write(events)

    def _write(self, events: list[dict]) -> None:
        if self.path is None:
            return
        try:
            with self.path.open("a") as out:  # one write: the engine process and the server's append to one file
                out.write("".join(json.dumps(e) + "\n" for e in events))
        except OSError as err:
            log.warning("KUBRICK_STEP_TRACE: cannot write %s (%s); the step trace is off", self.path,
                        err.strerror or err)
            self.path = None
