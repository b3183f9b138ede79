"""Stop strings: cut the streamed text at the first stop string, never showing any part of it."""

from __future__ import annotations

from kubrick.engine.api import ContentDelta, ReasoningDelta

Delta = ReasoningDelta | ContentDelta


class StopStrings:
    """Holds back just enough of each stream (reasoning, answer) to recognise a stop string split across deltas."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending: dict[type, str] = {}
        self.stopped = False

    def push(self, delta: Delta) -> tuple[str, bool]:
        """Text of this delta's kind that is safe to show now, and whether a stop string was reached."""
        if not self.stops:
            return delta.text, False
        kind = type(delta)
        text = self.pending.get(kind, "") + delta.text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.pending[kind] = ""
            return text[: min(hits)], True
        cut = max(0, len(text) - self.hold)
        self.pending[kind] = text[cut:]
        return text[:cut], False

    def flush(self) -> list[Delta]:
        """At the end of generation: the held-back tails, which turned out not to be stop strings."""
        out = [kind(text) for kind, text in self.pending.items() if text]
        self.pending = {}
        return out
