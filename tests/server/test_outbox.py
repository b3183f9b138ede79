"""The response thread's outbox handling (kubrick/server/outbox.py): merging queued deltas keeps every request's
text and order; checks for clients that left stay prompt for a few streams and bounded for many."""

import queue

from kubrick.engine.api import ContentDelta, Finished, ReasoningDelta, Usage
from kubrick.server.outbox import CANCEL_POLL_S, CANCEL_POLLS_PER_S, cancel_poll_interval, coalesced, drain


def test_a_requests_queued_deltas_of_one_kind_become_one_response_in_order():
    a, b = object(), object()
    done = Finished(Usage(1, 3, 0.1, 10.0), reason="stop")
    items = [
        (a, ReasoningDelta("thin")), (b, ContentDelta("x")), (a, ReasoningDelta("king")),
        (a, ContentDelta("Hel")), (b, ContentDelta("y")), (a, ContentDelta("lo")), (a, done), (b, ContentDelta("z")),
    ]
    merged = coalesced(items)
    assert [(r is a, type(o).__name__, getattr(o, "text", None)) for r, o in merged] == [
        (True, "ReasoningDelta", "thinking"),
        (False, "ContentDelta", "xyz"),
        (True, "ContentDelta", "Hello"),
        (True, "Finished", None),
    ]


def test_nothing_merges_across_a_requests_final_event():
    a = object()
    done = Finished(Usage(1, 1, 0.1, 10.0), reason="length")
    merged = coalesced([(a, ContentDelta("a")), (a, done), (a, ContentDelta("b"))])
    assert [getattr(o, "text", "final") for _, o in merged] == ["a", "final", "b"]


def test_drain_takes_everything_waiting_in_order():
    box = queue.Queue()
    for n in range(3):
        box.put(n)
    assert drain(box, "first") == ["first", 0, 1, 2] and box.empty()


def test_cancel_checks_stay_prompt_for_few_streams_and_bounded_for_many():
    assert cancel_poll_interval(1) == cancel_poll_interval(8) == CANCEL_POLL_S  # a lone user's leaving: within 50 ms
    for streams in (16, 64, 128, 1000):
        # all the streams' checks together stay within the budget of round trips a second
        assert streams / cancel_poll_interval(streams) <= CANCEL_POLLS_PER_S + 1e-9
    assert cancel_poll_interval(64) < 0.5  # a client that left at 64 streams is still noticed within half a second
