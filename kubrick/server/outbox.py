"""What llm_decoupled's response thread does with its outbox before sending: take everything waiting at once and
merge each request's consecutive deltas of one kind, so that under load one response carries several tokens'
text (every response is an IPC message from the Python backend to the server); and how often it asks whether a
request's client left (another IPC round trip each). Kept here, away from the Triton model, so it can be tested
without a server."""

from __future__ import annotations

import queue

from kubrick.engine.api import ContentDelta, ReasoningDelta

CANCEL_POLL_S = 0.05  # a request in flight is checked this often for a client that left ...
CANCEL_POLLS_PER_S = 200  # ... but all of them together at most this often: the response thread's time is the
# streams' latency, and at 64 streams checks every 50 ms would be 1,280 round trips a second beside the sends


def cancel_poll_interval(requests: int) -> float:
    """Seconds between two checks of one request for a client that left, with `requests` in flight."""
    return max(CANCEL_POLL_S, requests / CANCEL_POLLS_PER_S)


def drain(outbox: queue.Queue, first) -> list:
    """`first` and everything else already waiting in the outbox, in order."""
    items = [first]
    while True:
        try:
            items.append(outbox.get_nowait())
        except queue.Empty:
            return items


def coalesced(items: list[tuple[object, object]]) -> list[tuple[object, object]]:
    """(request, outcome) pairs with each request's consecutive deltas of one kind merged into one; the order of
    every request's own outcomes, and their text, are unchanged."""
    out: list[tuple[object, object]] = []
    last: dict[int, int] = {}  # id(request) -> index in out of that request's latest item
    for request, outcome in items:
        index = last.get(id(request))
        if (
            isinstance(outcome, (ReasoningDelta, ContentDelta))
            and index is not None
            and type(out[index][1]) is type(outcome)
        ):
            out[index] = (request, type(outcome)(out[index][1].text + outcome.text))
            continue
        last[id(request)] = len(out)
        out.append((request, outcome))
    return out
