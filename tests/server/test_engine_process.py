"""The engine in its own process (kubrick/server/engine_process.py): started for real on the tiny checkpoint, driven
the way the Triton model drives it, and killed to see what the clients are told."""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from pathlib import Path

import pytest

from kubrick.engine.api import (
    ContentDelta,
    EngineError,
    Finished,
    Message,
    ReasoningDelta,
    SamplingParams,
)
from kubrick.server.engine_process import EngineProcess
from kubrick.server.process import MODEL_NAME, start_local_server
from kubrick.server.serve import shipped_model_repository

from .conftest import TEST_CONTEXT_LENGTH, messages, stream_events

pytestmark = pytest.mark.slow

HELLO = [Message("user", "Hello there")]


def start(checkpoint: Path) -> tuple[EngineProcess, queue.Queue]:
    engine = EngineProcess.start({"checkpoint": str(checkpoint), "device": "cpu", "context_length": TEST_CONTEXT_LENGTH})
    events: queue.Queue = queue.Queue()
    engine.listen(on_events=lambda batch: [events.put(e) for e in batch], on_exit=lambda why: events.put(("exit", why)))
    return engine, events


def until_last(events: queue.Queue, request_id: int, timeout: float = 60.0) -> list[tuple]:
    """This request's (outcome, timing) pairs up to its last event."""
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = events.get(timeout=max(deadline - time.monotonic(), 0.01))
        if item[0] == request_id:
            got.append(item[1:])
            if not isinstance(item[1], (ReasoningDelta, ContentDelta)):
                return got
    raise AssertionError(f"request {request_id} did not end; got {got}")


def test_a_request_streams_text_then_finishes_with_its_timing(tiny_checkpoint):
    engine, events = start(tiny_checkpoint)
    try:
        assert engine.info["context_length"] == TEST_CONTEXT_LENGTH and "KV cache" in engine.info["kv_cache"]
        engine.submit(1, HELLO, SamplingParams(temperature=0, max_tokens=16))
        got = until_last(events, 1)
        *deltas, (last, timing) = got
        assert isinstance(last, Finished) and last.usage.completion_tokens == 16 and last.reason == "length"
        assert "".join(d.text for d, _ in deltas), "no text streamed"
        ttft, tpot = timing
        assert 0 < ttft < 60 and 0 < tpot < 10
        # The same greedy request again: the same text (the process keeps one engine for all requests).
        engine.submit(2, HELLO, SamplingParams(temperature=0, max_tokens=16))
        again = until_last(events, 2)
        assert [d.text for d, _ in again[:-1]] == [d.text for d, _ in deltas]
    finally:
        engine.stop()
    assert engine.process.returncode == 0


def test_cancel_ends_a_running_request_as_cancelled(tiny_checkpoint):
    engine, events = start(tiny_checkpoint)
    try:
        engine.submit(7, HELLO, SamplingParams(temperature=0, max_tokens=400))
        first = events.get(timeout=60)
        assert first[0] == 7 and isinstance(first[1], (ReasoningDelta, ContentDelta))
        engine.cancel(7)
        last, _ = until_last(events, 7)[-1]
        assert isinstance(last, Finished) and last.reason == "cancelled" and last.usage.completion_tokens < 400
    finally:
        engine.stop()


def test_stop_ends_requests_in_flight_with_a_shutdown_error(tiny_checkpoint):
    engine, events = start(tiny_checkpoint)
    engine.submit(3, HELLO, SamplingParams(temperature=0, max_tokens=400))
    assert events.get(timeout=60)[0] == 3
    engine.stop()
    last, _ = until_last(events, 3)[-1]
    assert isinstance(last, EngineError) and "shutting down" in str(last)
    assert engine.process.returncode == 0
    with pytest.raises(EngineError, match="shutting down"):
        engine.submit(4, HELLO, SamplingParams())


def test_a_checkpoint_that_cannot_load_is_one_error_and_no_process_left(tmp_path):
    with pytest.raises(EngineError, match="does not exist") as caught:
        EngineProcess.start({"checkpoint": str(tmp_path / "missing"), "device": "cpu", "context_length": None})
    assert "Traceback" not in str(caught.value)
    assert not [pid for pid in _engine_processes() if _parent(pid) == os.getpid()]


def test_a_dead_engine_process_is_reported_and_new_requests_fail_at_once(tiny_checkpoint):
    engine, events = start(tiny_checkpoint)
    try:
        os.kill(engine.process.pid, signal.SIGKILL)
        item = events.get(timeout=30)
        assert item == ("exit", "the engine process exited (exit code -9)")
        with pytest.raises(EngineError, match="exit code -9"):
            engine.submit(1, HELLO, SamplingParams())
    finally:
        engine.stop()


def test_a_request_sent_while_the_exit_is_being_reported_waits_for_the_report(tiny_checkpoint):
    """The model words its clients' error in on_exit (the remedy: restarting or not); a request that meets the dead
    process while on_exit still runs must not fail before it has (the race CI met: "the engine process is gone")."""
    engine = EngineProcess.start({"checkpoint": str(tiny_checkpoint), "device": "cpu",
                                  "context_length": TEST_CONTEXT_LENGTH})
    reported = []

    def slow_on_exit(why: str) -> None:
        time.sleep(1.0)
        reported.append(why)

    engine.listen(on_events=lambda batch: None, on_exit=slow_on_exit)
    try:
        os.kill(engine.process.pid, signal.SIGKILL)
        time.sleep(0.3)  # the receiver is inside on_exit now
        with pytest.raises(EngineError, match=r"^the engine process exited \(exit code -9\)$"):
            engine.submit(1, HELLO, SamplingParams())
        assert reported == ["the engine process exited (exit code -9)"]
    finally:
        engine.stop()


def test_through_the_server_a_dead_engine_ends_its_requests_with_an_error_and_comes_back(tiny_checkpoint):
    """Kill the engine process under a real tritonserver: the stream in flight ends with an error event that says
    what happened, the engine is started again and serves the next requests; killed again at once (a crash loop),
    it stays down and says so."""
    import httpx

    server = start_local_server(tiny_checkpoint, shipped_model_repository(), context_length=TEST_CONTEXT_LENGTH)
    try:
        (engine_pid,) = [pid for pid in _engine_processes() if _descends_from(pid, server.process.pid)]
        body = {"text_input": messages("Count slowly to a thousand."),
                "parameters": {"streaming": True, "temperature": 0, "max_tokens": 400}}
        in_flight = []
        with httpx.stream("POST", f"{server.url}/v2/models/{MODEL_NAME}/generate_stream", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    in_flight.append(json.loads(json.loads(line[5:])["text_output"]))
                    if len(in_flight) == 1:  # the reply has begun: now the engine goes
                        os.kill(engine_pid, signal.SIGKILL)
        assert in_flight[0]["type"] in ("reasoning", "chunk")
        assert in_flight[-1]["type"] == "error", in_flight[-3:]
        assert in_flight[-1]["content"] == ("the engine process exited (exit code -9); it is restarting: send the "
                                            "request again shortly")
        deadline, after = time.monotonic() + 120, []
        while time.monotonic() < deadline:  # errors while it restarts, then replies again
            after = stream_events(server.url, messages("Hello?"), {"max_tokens": 4}, timeout=30)
            if after[-1]["type"] == "complete":
                break
            assert "restarting" in after[-1]["content"], after
            time.sleep(0.5)
        assert after[-1]["type"] == "complete", after
        assert "the engine process is back" in server.log_text()

        (again,) = [pid for pid in _engine_processes() if _descends_from(pid, server.process.pid)]
        assert again != engine_pid
        os.kill(again, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = stream_events(server.url, messages("Hello?"), {"max_tokens": 4}, timeout=30)
            if after[-1]["type"] == "error":
                break
        assert after[-1]["content"] == "the engine process exited (exit code -9); restart the server"
        assert httpx.get(server.url + "/v2/health/live", timeout=10).status_code == 200
    finally:
        server.stop()
    assert not [pid for pid in _engine_processes() if _descends_from(pid, server.process.pid)]


def _engine_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"kubrick.server.engine_process" in cmdline:
                pids.append(int(entry.name))
    return pids


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False
