"""An optional record of what the scheduler's thread does, to find where the gaps between tokens come from.

Set KUBRICK_STEP_TRACE to a file path and the engine thread appends one JSON line per event:
  {"ev": "launch", "t": start, "ms": host time, "kind": "decode" | "mixed" | "chained", "rows": n, "prefill": tokens}
  {"ev": "wait", "t": start, "ms": time blocked reading a step's picks back}
  {"ev": "deliver", "t": start, "ms": time streaming text, "n": tokens streamed}
t is time.perf_counter() in seconds. Lines are buffered and written every 512 events and when the scheduler
stops, so tracing costs the engine thread a few microseconds an event. `scripts/step_trace.py FILE` summarises.
A path that cannot be written turns tracing off with one warning: a diagnostic must never fail a request.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class StepTrace:
    def __init__(self, path: Path):
        self.path: Path | None = path  # None once writing failed: tracing is off
        self._events: list[dict] = []

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get("KUBRICK_STEP_TRACE")
        if not path:
            return None
        trace = cls(Path(path))
        trace._write([])  # fail now, at start, if the file cannot be opened
        return trace if trace.path is not None else None

    def add(self, ev: str, start: float, **fields) -> None:
        """One event that began at `start` (perf_counter) and ends now."""
        if self.path is None:
            return
        self._events.append(dict(ev=ev, t=round(start, 6), ms=round((time.perf_counter() - start) * 1e3, 3), **fields))
        if len(self._events) >= 512:
            self.flush()

    def flush(self) -> None:
        events, self._events = self._events, []
        if events:
            self._write(events)

    def _write(self, events: list[dict]) -> None:
        if self.path is None:
            return
        try:
            with self.path.open("a") as out:
                out.writelines(json.dumps(e) + "\n" for e in events)
        except OSError as err:
            log.warning("KUBRICK_STEP_TRACE: cannot write %s (%s); the step trace is off", self.path,
                        err.strerror or err)
            self.path = None
