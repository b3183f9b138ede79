"""Continuous batching through the real scheduler on the tiny checkpoint (CPU): what each user of a shared
server would notice. Requests join and leave a running batch and still get exactly their own replies; a full
cache makes new requests wait, never fail; a request that could never fit is told so at once; the next turn of
a chat reuses the cached history; cancelled requests leave nothing behind; a long prompt does not freeze the
other streams."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kubrick.engine.api import EngineError, Finished, InvalidRequest, Message, SamplingParams
from kubrick.engine.paged_cache import PagedKVCache
from kubrick.engine.scheduler import RequestHandle, Scheduler

BLOCK = 16


REPO = Path(__file__).resolve().parents[2]


def make_engine(checkpoint, **settings):
    from kubrick.engine.engine import Engine

    defaults = dict(device="cpu", context_length=1024, max_batch=8, step_tokens=32, block_size=BLOCK)
    return Engine(checkpoint, **{**defaults, **settings})


@pytest.fixture(scope="module")
def engine(tiny_original):
    return make_engine(tiny_original)


@pytest.fixture
def scheduler(engine):
    engine.paged.drop_cached()  # each test starts cold
    scheduler = Scheduler(engine)
    try:
        yield scheduler
    finally:
        scheduler.stop()


class Reply:
    """One request's events; `text` is its reasoning and answer as a person would read them."""

    def __init__(self, on_event=None):
        self.events: list = []
        self.done = threading.Event()
        self.first = threading.Event()
        self.on_event = on_event

    def __call__(self, outcome) -> None:
        self.events.append(outcome)
        self.first.set()
        if self.on_event:
            self.on_event(self, outcome)
        if isinstance(outcome, (Finished, EngineError)):
            self.done.set()

    @property
    def last(self):
        return self.events[-1]

    @property
    def text(self) -> list[tuple[str, str]]:
        return [(type(e).__name__, e.text) for e in self.events if hasattr(e, "text")]


def ask(text: str) -> list[Message]:
    return [Message("user", text)]


def run_alone(engine, messages, params) -> Reply:
    scheduler = Scheduler(engine)
    try:
        reply = Reply()
        scheduler.submit(messages, params, reply)
        assert reply.done.wait(120)
        return reply
    finally:
        scheduler.stop()


def test_requests_joining_and_leaving_a_running_batch_get_exactly_their_solo_replies(engine, scheduler):
    requests = [
        (ask("Tell me a long story about a lighthouse."), SamplingParams(temperature=0, max_tokens=40)),
        (ask("What is two plus two?"), SamplingParams(temperature=0, max_tokens=7)),
        (ask("Name a colour."), SamplingParams(temperature=0.8, seed=11, max_tokens=15)),
        (ask("Say something short."), SamplingParams(temperature=0, max_tokens=25, stop=("e",))),
    ]
    alone = [run_alone(engine, m, p) for m, p in requests]
    engine.paged.drop_cached()

    running_seen: list[int] = []
    replies = [Reply(lambda r, e: running_seen.append(scheduler.running)) for _ in requests]
    scheduler.submit(*requests[0], replies[0])
    assert replies[0].first.wait(60)  # the first is streaming when the others join
    for (messages, params), reply in zip(requests[1:], replies[1:]):
        scheduler.submit(messages, params, reply)
    assert all(r.done.wait(120) for r in replies)

    assert max(running_seen) >= 3  # they really shared steps
    for solo, batched in zip(alone, replies):
        assert isinstance(batched.last, Finished)
        assert batched.text == solo.text
        assert batched.last.reason == solo.last.reason
        assert batched.last.usage.completion_tokens == solo.last.usage.completion_tokens
    assert engine.paged.usage() == 0


def test_queueing_each_step_behind_the_last_changes_no_reply(engine):
    # Chained steps feed the last step's picks on the device and read them back a step late; a request that
    # stops (max_tokens, a stop string) leaves mid-chain and its row of the queued step is dropped. Sampled
    # rows chain too: their draws are made on the device, keyed by each request's seed and draw count.
    requests = [
        (ask("Tell me a long story about a lighthouse."), SamplingParams(temperature=0, max_tokens=30)),
        (ask("What is two plus two?"), SamplingParams(temperature=0.9, seed=5, max_tokens=5)),
        (ask("Say something short."), SamplingParams(temperature=0, max_tokens=25, stop=("e",))),
        (ask("Count to ten."), SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12)),
    ]
    runs, chained = {}, {"steps": 0}
    real = engine.forward_batch

    def counting(segments, device_tokens=None):
        chained["steps"] += device_tokens is not None
        return real(segments, device_tokens=device_tokens)

    engine.forward_batch = counting
    try:
        for chain in (False, True):
            engine.paged.drop_cached()
            scheduler = Scheduler(engine, chain=chain)
            try:
                replies = [Reply() for _ in requests]
                for (messages, params), reply in zip(requests, replies):
                    scheduler.submit(messages, params, reply)
                assert all(r.done.wait(120) for r in replies)
            finally:
                scheduler.stop()
            runs[chain] = replies
            if not chain:
                assert chained["steps"] == 0
    finally:
        del engine.forward_batch
    assert chained["steps"] >= 10
    for plain, queued in zip(runs[False], runs[True]):
        assert isinstance(queued.last, Finished) and queued.text == plain.text
        assert queued.last.reason == plain.last.reason
        assert queued.last.usage.completion_tokens == plain.last.usage.completion_tokens
    assert engine.paged.usage() == 0


@contextlib.contextmanager
def steps_fed_on_device(engine):
    """While inside: for each engine step in order, whether it was fed the last step's picks on the device
    (a chained step)."""
    fed, real = [], engine.forward_batch

    def recording(segments, device_tokens=None):
        fed.append(device_tokens is not None)
        return real(segments, device_tokens=device_tokens)

    engine.forward_batch = recording
    try:
        yield fed
    finally:
        del engine.forward_batch


def test_requests_that_leave_mid_chain_do_not_break_it(engine, scheduler):
    # Each step is queued behind the last before its picks are read. When a pick in flight was a request's last
    # (max_tokens), the chain used to stop: the GPU then idled while the host read the picks, planned and
    # launched, at every request's end (a step in five at 64 streams). Now that last pick is fed and its row
    # dropped, and the next step leaves the request out.
    with steps_fed_on_device(engine) as fed_on_device:
        replies = [Reply() for _ in range(3)]
        for max_tokens, reply in zip((40, 9, 4), replies):  # the longest first: it runs while the others leave
            scheduler.submit(ask("Name a river."), SamplingParams(temperature=0, max_tokens=max_tokens), reply)
        assert all(r.done.wait(120) for r in replies)
    assert [r.last.usage.completion_tokens for r in replies if r.last.reason == "length"] == [
        n for n, r in zip((40, 9, 4), replies) if r.last.reason == "length"]
    first = fed_on_device.index(True)
    assert all(fed_on_device[first:]), fed_on_device
    assert sum(fed_on_device) >= 30
    assert engine.paged.usage() == 0


def test_a_request_that_reaches_the_context_mid_chain_gets_every_token_the_context_holds(tiny_original):
    # Its last pick is fed at the context's last position by the step queued behind: admission reserved it.
    engine = make_engine(tiny_original, context_length=160)
    long_prompt, short_prompt = ask("word " * 40), ask("Name a river.")
    alone = run_alone(engine, long_prompt, SamplingParams(temperature=0, max_tokens=500))
    scheduler = Scheduler(engine)
    try:
        with steps_fed_on_device(engine) as fed_on_device:
            short, long = Reply(), Reply()
            scheduler.submit(short_prompt, SamplingParams(temperature=0, max_tokens=500), short)
            scheduler.submit(long_prompt, SamplingParams(temperature=0, max_tokens=500), long)
            assert short.done.wait(120) and long.done.wait(120)
    finally:
        scheduler.stop()
    for reply in (short, long):
        assert isinstance(reply.last, Finished) and reply.last.reason == "length"
        assert reply.last.usage.prompt_tokens + reply.last.usage.completion_tokens == 160
    assert long.text == alone.text  # the same tokens as alone, up to the context's end
    first = fed_on_device.index(True)
    assert all(fed_on_device[first:]), fed_on_device  # the long request leaving did not break the chain
    assert engine.paged.usage() == 0


def test_admission_promises_room_for_every_token_a_request_may_feed_its_last_pick_included(tiny_original):
    # A chained step may feed a request's last pick before it is read, so a request needs prompt + max_tokens
    # positions, not one fewer: with 12 blocks (192 positions) one that needs exactly 192 runs to its end, and
    # one that needs 193 is told at once that it can never fit (rather than failing at its last token).
    engine = make_engine(tiny_original, max_batch=2, step_tokens=32, kv_cache_memory=_budget(tiny_original, 12, 2, 32))
    prompt = len(engine.prepare(ask("hi"), SamplingParams())[0])
    fits, too_big = Reply(), Reply()
    scheduler = Scheduler(engine)
    try:
        scheduler.submit(ask("hi"), SamplingParams(temperature=0, max_tokens=12 * BLOCK - prompt), fits)
        scheduler.submit(ask("hi"), SamplingParams(temperature=0, max_tokens=12 * BLOCK - prompt + 1), too_big)
        assert fits.done.wait(120) and too_big.done.wait(120)
    finally:
        scheduler.stop()
    assert isinstance(fits.last, Finished) and fits.last.reason in ("length", "stop")
    assert isinstance(too_big.last, InvalidRequest) and f"needs room for {12 * BLOCK + 1} tokens" in str(too_big.last)
    assert engine.paged.usage() == 0


def test_a_draw_that_breaks_ends_its_step_s_requests_with_a_reason_and_the_next_request_is_served(
        engine, scheduler, monkeypatch):
    import kubrick.engine.scheduler as scheduler_module

    real, calls = scheduler_module._pick, {"n": 0}

    def breaks_on_the_third_step(logits, actives):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the sampling kernel broke")
        return real(logits, actives)

    monkeypatch.setattr(scheduler_module, "_pick", breaks_on_the_third_step)
    broken = Reply()
    scheduler.submit(ask("Tell me a story."), SamplingParams(temperature=1.0, seed=1, max_tokens=20), broken)
    assert broken.done.wait(60)
    assert isinstance(broken.last, EngineError)
    assert "the engine failed on this request (RuntimeError: the sampling kernel broke)" in str(broken.last)
    served = Reply()
    scheduler.submit(ask("Tell me a story."), SamplingParams(temperature=1.0, seed=1, max_tokens=5), served)
    assert served.done.wait(60)
    assert isinstance(served.last, Finished) and served.last.usage.completion_tokens == 5
    assert engine.paged.usage() == 0  # the broken request's blocks were freed


def test_a_burst_of_new_requests_is_rendered_a_few_a_step_while_a_stream_runs(engine, scheduler):
    # Rendering a long prompt takes ~1 ms of the engine thread: 20 arriving at once must not stall the stream.
    from kubrick.engine.scheduler import PREPARE_PER_STEP

    log: list[str] = []
    burst = [Reply() for _ in range(20)]
    real_prepare, real_step = engine.prepare, engine.forward_batch

    def step(*args, **kwargs):
        if log.count("step") == 3:  # all 20 arrive while the engine thread runs a step: one sweep sees them
            for i, reply in enumerate(burst):
                scheduler.submit(ask(f"Question {i}: " + "word " * 50), SamplingParams(temperature=0, max_tokens=2),
                                 reply)
        log.append("step")
        return real_step(*args, **kwargs)

    engine.prepare = lambda *a, **k: (log.append("prepare"), real_prepare(*a, **k))[1]
    engine.forward_batch = step
    try:
        streaming = Reply()
        stream = scheduler.submit(ask("Tell me about rivers."), SamplingParams(temperature=0, max_tokens=200), streaming)
        assert all(r.done.wait(120) for r in burst)
        stream.cancel()
        assert streaming.done.wait(60)
    finally:
        del engine.prepare, engine.forward_batch
    runs = "".join("p" if e == "prepare" else "s" for e in log).split("s")
    assert log.count("prepare") == 21 and max(len(run) for run in runs) <= PREPARE_PER_STEP
    assert all(isinstance(r.last, Finished) for r in burst)


def test_when_the_cache_is_full_a_request_waits_then_runs(tiny_original):
    # Room for 12 full blocks (192 positions) beside the window blocks of 2 sequences.
    engine = make_engine(tiny_original, max_batch=2, step_tokens=32, kv_cache_memory=_budget(tiny_original, 12, 2, 32))
    scheduler = Scheduler(engine)
    try:
        assert engine.paged.capacity_tokens() == 12 * BLOCK
        params = SamplingParams(temperature=0, max_tokens=100)  # a 68-token prompt + 100: 11 of the 12 blocks
        second, handles = Reply(), {}

        def submit_second_once(reply, event):  # on the engine thread, while the first is surely running
            if "second" not in handles:
                handles["second"] = scheduler.submit(ask("ho"), params, second)

        first = Reply(submit_second_once)
        handles["first"] = scheduler.submit(ask("hi"), params, first)
        assert first.done.wait(120) and second.done.wait(120)
        assert isinstance(first.last, Finished) and isinstance(second.last, Finished)
        assert handles["second"].started_at >= handles["first"].finished_at  # it ran once the first freed its blocks
        assert scheduler.waiting == 0 and engine.paged.usage() == 0
    finally:
        scheduler.stop()


def test_a_request_that_could_never_fit_is_refused_at_once_even_behind_waiting_ones(tiny_original):
    engine = make_engine(tiny_original, max_batch=2, step_tokens=32, kv_cache_memory=_budget(tiny_original, 12, 2, 32))
    scheduler = Scheduler(engine)
    try:
        params = SamplingParams(temperature=0, max_tokens=100)  # 11 of the 12 blocks: the next one must wait
        waiting, too_big, handles = Reply(), Reply(), {}

        def submit_the_others_once(reply, event):  # on the engine thread, while the first surely runs
            if not handles:
                handles["waiting"] = scheduler.submit(ask("ho"), params, waiting)
                handles["too big"] = scheduler.submit(ask("hi"), SamplingParams(temperature=0, max_tokens=500), too_big)

        first = Reply(submit_the_others_once)
        scheduler.submit(ask("hi"), params, first)
        assert first.done.wait(120) and waiting.done.wait(120) and too_big.done.wait(60)
        assert too_big.events == [too_big.last] and isinstance(too_big.last, InvalidRequest)
        assert "KV cache holds 192" in str(too_big.last) and "max_tokens" in str(too_big.last)
        assert handles["too big"].finished_at < handles["waiting"].started_at  # told at once, not after a wait
        assert isinstance(waiting.last, Finished)
    finally:
        scheduler.stop()


def test_sampled_replies_are_reused_by_the_next_turn_too(engine, scheduler):
    # kubrick's default is temperature 1: a sampled reply, sent back as text in the next turn's history, must
    # render to the same tokens, so every turn finds the whole blocks of the previous turn's prompt.
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=3)
    history = [Message("user", "Sampled: let us plan a trip to the mountains, with a long list of things to pack.")]
    reused, prompts = [], []
    for turn in range(4):
        reply = Reply()
        handle = scheduler.submit(history, params, reply)
        assert reply.done.wait(60) and isinstance(reply.last, Finished)
        reused.append(handle.reused_tokens)
        prompts.append(handle.prompt_tokens)
        answer = "".join(text for kind, text in reply.text if kind == "ContentDelta") or "ok"
        history = history + [Message("assistant", answer), Message("user", f"And on day {turn + 2}?")]
    for turn in range(1, 4):
        assert reused[turn] >= prompts[turn - 1] // BLOCK * BLOCK > 0, (reused, prompts)


def test_the_next_turn_of_a_chat_reuses_the_cached_history_and_replies_as_a_cold_start(engine, scheduler):
    params = SamplingParams(temperature=0, max_tokens=12)
    history = [Message("user", "Let us plan a trip to the mountains, with a long list of things to pack.")]
    reused, prompts = [], []
    for turn in range(3):
        reply = Reply()
        handle = scheduler.submit(history, params, reply)
        assert reply.done.wait(60)
        reused.append(handle.reused_tokens)
        prompts.append(handle.prompt_tokens)
        answer = "".join(text for kind, text in reply.text if kind == "ContentDelta") or "ok"
        history = history + [Message("assistant", answer), Message("user", f"And on day {turn + 2}?")]
    assert reused[0] == 0
    # Each later turn finds at least the whole blocks of the previous turn's prompt.
    assert reused[1] >= prompts[0] // BLOCK * BLOCK > 0
    assert reused[2] >= prompts[1] // BLOCK * BLOCK > reused[1]

    warm = run_alone(engine, history, params)
    engine.paged.drop_cached()
    cold_scheduler = Scheduler(engine)
    try:
        cold = Reply()
        handle = cold_scheduler.submit(history, params, cold)
        assert cold.done.wait(60) and handle.reused_tokens == 0
    finally:
        cold_scheduler.stop()
    assert warm.text == cold.text


def test_a_thousand_cancelled_requests_leave_only_reusable_prefix_blocks(tiny_original):
    engine = make_engine(tiny_original, max_batch=32, step_tokens=96)
    scheduler = Scheduler(engine)
    try:
        replies = [Reply() for _ in range(1000)]
        handles = [
            scheduler.submit(ask(f"question number {i}"), SamplingParams(temperature=0, max_tokens=200), reply)
            for i, reply in enumerate(replies)
        ]
        # Cancel each at a different point: before it starts, in its prompt, after 1 to 3 tokens.
        pending = set(range(1000))
        while pending:
            for i in list(pending):
                handle = handles[i]
                if i % 5 == 0 or (i % 5 == 1 and handle.started_at) or handle.generated_tokens >= i % 5 - 1:
                    handle.cancel()
                    pending.discard(i)
            time.sleep(0.001)
        assert all(r.done.wait(300) for r in replies)
        assert all(isinstance(r.last, Finished) for r in replies)
        assert sum(r.last.reason == "cancelled" for r in replies) >= 900  # a few may end on their own first

        cache = engine.paged
        for pool in (cache.full_pool, cache.window_pool):
            assert pool.referenced() == 0 and all(refs == 0 for refs in pool.refs)
            assert len(pool.free) + len(pool.cached) == pool.num_blocks
            assert set(pool.cached) == set(pool.key_of) and len(pool.by_key) == len(pool.cached)  # all findable
        assert cache.outstanding() == (0, 0) and cache.usage() == 0 and cache.sequences == {}
        assert len(cache.full_pool.cached) > 0  # the shared system prompt, for one
        again = Reply()
        handle = scheduler.submit(ask("question number 1"), SamplingParams(temperature=0, max_tokens=2), again)
        assert again.done.wait(60) and handle.reused_tokens > 0
    finally:
        scheduler.stop()


def test_a_long_prompt_is_read_in_chunks_while_other_streams_keep_producing(engine, scheduler):
    streaming = Reply()
    a = scheduler.submit(ask("Tell me about rivers."), SamplingParams(temperature=0, max_tokens=200), streaming)
    assert streaming.first.wait(60)
    seen: dict[str, int] = {}
    long_reply = Reply(lambda r, e: seen.setdefault("at_first_token", a.generated_tokens))
    seen["at_submit"] = a.generated_tokens
    scheduler.submit(ask("word " * 600), SamplingParams(temperature=0, max_tokens=3), long_reply)
    assert long_reply.done.wait(120)
    a.cancel()
    assert streaming.done.wait(60)
    assert streaming.last.reason == "cancelled"  # it was still streaming when the long prompt got its answer
    # 600 prompt tokens at most 32 a step (one of them the running stream's) take 20 steps or more: the
    # running stream got a token in each.
    assert seen["at_first_token"] - seen["at_submit"] >= 15


def stream_beside_a_long_prompt(scheduler) -> RequestHandle:
    """A greedy stream runs while a 200-word prompt is read in chunks beside it; returns the stream's handle
    once the long request has its answer and the stream is cancelled."""
    streaming, long_reply = Reply(), Reply()
    stream = scheduler.submit(ask("Tell me about rivers."), SamplingParams(temperature=0, max_tokens=200), streaming)
    assert streaming.first.wait(60)
    scheduler.submit(ask("word " * 200), SamplingParams(temperature=0, max_tokens=2), long_reply)
    assert long_reply.done.wait(120)
    stream.cancel()
    assert streaming.done.wait(60)
    return stream


def test_a_stream_gets_the_tokens_already_picked_before_a_step_with_a_prompt_chunk_runs(engine, scheduler):
    # A step that reads a prompt chunk runs eagerly and holds the engine thread until the GPU is done; a token
    # picked before it must reach its stream first, not after it (the stream would wait for two steps).
    held_back, mixed = [], {"steps": 0}
    real = engine.forward_batch

    def watching(segments, device_tokens=None):
        if any(seq.length + len(tokens) < len(seq.tokens) or len(tokens) > 1 for seq, tokens in segments):
            mixed["steps"] += 1
            held_back.extend(token for active, token in scheduler._pending if not active.ended)
        return real(segments, device_tokens=device_tokens)

    engine.forward_batch = watching
    try:
        stream_beside_a_long_prompt(scheduler)
    finally:
        del engine.forward_batch
    assert mixed["steps"] >= 6  # the long prompt shared several steps with the stream
    assert held_back == []


def test_the_step_trace_records_the_steps_a_long_prompt_shares_with_a_stream(engine, tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("KUBRICK_STEP_TRACE", str(trace))
    engine.paged.drop_cached()
    scheduler = Scheduler(engine)
    try:
        stream = stream_beside_a_long_prompt(scheduler)
    finally:
        scheduler.stop()
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    launches = [e for e in events if e["ev"] == "launch"]
    shared = [e for e in launches if e["kind"] in ("mixed", "chained mixed") and e["rows"] == 2]
    # 200+ prompt tokens in chunks of at most 31 (32 a step, one for the stream): several shared steps, and
    # the prompt's chunks ride on the stream's chain of steps rather than breaking it.
    assert len(shared) >= 6 and all(0 < e["prefill"] <= 31 for e in shared)
    assert sum(e["kind"] == "chained mixed" for e in shared) >= len(shared) - 2
    # The long request leaving (max_tokens 2) does not break the chain: every step after the first chained one is.
    first_chained = next(i for i, e in enumerate(launches) if e["kind"].startswith("chained"))
    assert all(e["kind"].startswith("chained") for e in launches[first_chained:])
    streamed = sum(e["n"] for e in events if e["ev"] == "deliver")
    assert streamed >= stream.generated_tokens - 2  # every sampled token's text, but the last step's or two
    summary = subprocess.run([sys.executable, "scripts/step_trace.py", str(trace), "--worst", "1000"],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "gaps between deliveries" in summary and "mixed(2 rows" in summary


def test_the_step_trace_records_triton_compiles_and_the_summary_names_them(tmp_path, monkeypatch):
    # On a GPU a step that meets new kernel arguments stalls while Triton compiles; the trace shows which
    # kernel. The CPU interpreter compiles nothing, so this calls the hooks Triton's JIT calls around a compile.
    from types import SimpleNamespace

    from triton import knobs

    from kubrick.engine.step_trace import StepTrace

    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("KUBRICK_STEP_TRACE", str(path))
    trace = StepTrace.from_env()
    try:
        start = time.perf_counter()
        trace.add("deliver", start, n=1)
        kernel = SimpleNamespace(name="_mlp1_swiglu_grouped_kernel")
        hook_args = dict(repr="", compile={}, is_manual_warmup=False, already_compiled=False)
        assert knobs.runtime.jit_cache_hook(key="k1", fn=kernel, **hook_args) is None  # Triton goes on compiling
        time.sleep(0.02)
        knobs.runtime.jit_post_compile_hook(key="k1", fn=kernel, **hook_args)
        trace.add("deliver", time.perf_counter(), n=1)
    finally:
        trace.close()
    assert knobs.runtime.jit_cache_hook is None and knobs.runtime.jit_post_compile_hook is None
    compiles = [json.loads(line) for line in path.read_text().splitlines() if '"compile"' in line]
    assert len(compiles) == 1 and compiles[0]["kernel"] == kernel.name and compiles[0]["ms"] >= 20
    summary = subprocess.run([sys.executable, "scripts/step_trace.py", str(path)], capture_output=True, text=True,
                             check=True, cwd=REPO).stdout
    assert "_mlp1_swiglu_grouped_kernel: 1," in summary and "compile _mlp1_swiglu_grouped_kernel" in summary


def test_the_step_trace_records_garbage_collector_pauses(tmp_path, monkeypatch):
    import gc

    from kubrick.engine.step_trace import StepTrace

    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("KUBRICK_STEP_TRACE", str(path))
    monkeypatch.setattr(StepTrace, "GC_PAUSE_S", 0.0)  # every pause, however short
    trace = StepTrace.from_env()
    try:
        gc.collect()
    finally:
        trace.close()
    gc.collect()  # after close: not recorded
    pauses = [json.loads(line) for line in path.read_text().splitlines()]
    assert [p["generation"] for p in pauses] == [2] and pauses[0]["ev"] == "gc"
    summary = subprocess.run([sys.executable, "scripts/step_trace.py", str(path)], capture_output=True, text=True,
                             check=True, cwd=REPO).stdout
    assert "garbage collector pauses" in summary


def test_a_step_trace_that_cannot_be_written_is_turned_off_and_requests_are_served(engine, tmp_path, monkeypatch,
                                                                                  caplog):
    monkeypatch.setenv("KUBRICK_STEP_TRACE", str(tmp_path / "no-such-dir" / "trace.jsonl"))
    engine.paged.drop_cached()
    with caplog.at_level("WARNING"):
        scheduler = Scheduler(engine)
    try:
        reply = Reply()
        scheduler.submit(ask("Hi"), SamplingParams(temperature=0, max_tokens=8), reply)
        assert reply.done.wait(60)
    finally:
        scheduler.stop()
    assert isinstance(reply.last, Finished) and reply.last.usage.completion_tokens == 8
    assert any("KUBRICK_STEP_TRACE: cannot write" in r.message and "the step trace is off" in r.message
               for r in caplog.records)


def test_the_step_trace_summary_refuses_a_file_that_is_not_a_trace(tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text('{"clients": 64}\n')
    done = subprocess.run([sys.executable, "scripts/step_trace.py", str(other)], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"step_trace: {other} is not a KUBRICK_STEP_TRACE file (each line needs ev, t and ms)"


def _budget(checkpoint, full_blocks: int, max_batch: int, step_tokens: int) -> str:
    """A kv-cache-memory setting giving exactly `full_blocks` full-attention blocks to the tiny model."""
    from kubrick.engine.config import ModelConfig  # noqa: F401  (the tiny preset's shape, read from the checkpoint)
    from kubrick.engine.checkpoint import load_checkpoint

    config, _ = load_checkpoint(checkpoint)
    sliding = sum(config.is_sliding(n) for n in range(config.num_hidden_layers))
    full = PagedKVCache.block_bytes(config.num_hidden_layers - sliding, config.num_key_value_heads, config.head_dim, BLOCK)
    window = PagedKVCache.block_bytes(sliding, config.num_key_value_heads, config.head_dim, BLOCK)
    span = -(-(config.sliding_window + step_tokens) // BLOCK) + 1
    return f"{full_blocks * full + 2 * max_batch * span * window}B"
