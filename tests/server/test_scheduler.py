"""The engine's request loop (kubrick.engine.scheduler) on the real engine and the tiny checkpoint, in-process."""

from __future__ import annotations

import threading

import pytest

from kubrick.engine.api import ContentDelta, EngineError, Finished, InvalidRequest, Message, ReasoningDelta, SamplingParams
from kubrick.engine.scheduler import Scheduler

from .conftest import TEST_CONTEXT_LENGTH


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from kubrick.engine.engine import Engine

    return Engine(tiny_checkpoint, device="cpu", context_length=TEST_CONTEXT_LENGTH)


@pytest.fixture
def scheduler(engine):
    scheduler = Scheduler(engine)
    try:
        yield scheduler
    finally:
        scheduler.stop()


class Recorder:
    """Collects one request's events; `done` is set on the terminal one."""

    def __init__(self, name: str = "", order: list | None = None):
        self.name, self.order = name, order
        self.events: list = []
        self.done = threading.Event()
        self.first = threading.Event()

    def __call__(self, outcome) -> None:
        self.events.append(outcome)
        self.first.set()
        if isinstance(outcome, (Finished, EngineError)):
            if self.order is not None:
                self.order.append(self.name)
            self.done.set()

    @property
    def last(self):
        return self.events[-1]


def ask(text: str) -> list[Message]:
    return [Message("user", text)]


GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_a_request_streams_deltas_and_ends_with_finished(scheduler):
    recorder = Recorder()
    scheduler.submit(ask("hello"), GREEDY, recorder)
    assert recorder.done.wait(60)
    assert isinstance(recorder.last, Finished) and recorder.last.reason in ("stop", "length")
    assert all(isinstance(e, (ReasoningDelta, ContentDelta)) for e in recorder.events[:-1])
    assert sum(isinstance(e, Finished) for e in recorder.events) == 1
    assert scheduler.running == 0 and scheduler.waiting == 0


def test_requests_are_started_in_arrival_order(scheduler):
    recorders = [Recorder(str(i)) for i in range(3)]
    handles = [scheduler.submit(ask(f"question {i}"), GREEDY, r) for i, r in enumerate(recorders)]
    assert all(r.done.wait(60) for r in recorders)
    starts = [h.started_at for h in handles]
    assert None not in starts and starts == sorted(starts)


def test_cancelling_a_running_request_stops_it_within_a_decode_step(scheduler):
    recorder = Recorder()
    cancelled = threading.Event()

    def hold_after_first_event(outcome):
        recorder(outcome)
        if len(recorder.events) == 1:
            cancelled.wait(10)  # the engine waits here until the test has cancelled

    handle = scheduler.submit(ask("write a long essay"), SamplingParams(temperature=0, max_tokens=400), hold_after_first_event)
    assert recorder.first.wait(60)
    handle.cancel()
    cancelled.set()
    assert recorder.done.wait(60)
    assert isinstance(recorder.last, Finished) and recorder.last.reason == "cancelled"
    # The engine checks the token before each decode step: after the cancel at most the text it already held
    # (one flush) and the Finished event arrive.
    assert len(recorder.events) <= 3
    assert recorder.last.usage.completion_tokens < 400
    assert scheduler.running == 0


def test_cancelling_a_waiting_request_skips_it(scheduler):
    blocker = Recorder()
    scheduler.submit(ask("first"), SamplingParams(temperature=0, max_tokens=64), blocker)
    assert blocker.first.wait(60)
    waiting = Recorder()
    handle = scheduler.submit(ask("second"), GREEDY, waiting)
    handle.cancel()
    assert waiting.done.wait(60) and blocker.done.wait(60)
    assert waiting.events == [waiting.last] and waiting.last.reason == "cancelled"
    assert waiting.last.usage.completion_tokens == 0


def test_a_bad_request_ends_with_its_error_and_the_next_one_is_served(scheduler):
    bad, good = Recorder(), Recorder()
    scheduler.submit(ask("word " * (TEST_CONTEXT_LENGTH * 2)), GREEDY, bad)
    scheduler.submit(ask("hi"), GREEDY, good)
    assert bad.done.wait(60) and good.done.wait(60)
    assert bad.events == [bad.last] and isinstance(bad.last, InvalidRequest)
    assert "context" in str(bad.last)
    assert isinstance(good.last, Finished)


def test_a_listener_that_raises_does_not_stop_the_engine(scheduler):
    def broken(outcome):
        raise RuntimeError("listener bug")

    scheduler.submit(ask("one"), GREEDY, broken)
    recorder = Recorder()
    scheduler.submit(ask("two"), GREEDY, recorder)
    assert recorder.done.wait(60) and isinstance(recorder.last, Finished)


def test_stop_ends_every_request_with_an_error_a_person_can_read(engine):
    scheduler = Scheduler(engine)
    running, waiting = Recorder(), Recorder()
    scheduler.submit(ask("long"), SamplingParams(temperature=0, max_tokens=400), running)
    assert running.first.wait(60)
    scheduler.submit(ask("queued"), GREEDY, waiting)
    scheduler.stop()
    assert running.done.is_set() and waiting.done.is_set()
    for recorder in (running, waiting):
        assert isinstance(recorder.last, EngineError) and "shutting down" in str(recorder.last)
    late = Recorder()
    scheduler.submit(ask("too late"), GREEDY, late)
    assert late.done.is_set() and isinstance(late.last, EngineError)
