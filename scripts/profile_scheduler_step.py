#!/usr/bin/env python
"""Where a batch-1 decode step of the scheduler spends its time, against the GPU time of the step itself.

Prints, for one sequence on the Engine the server runs (kernel engine, paged KV cache, CUDA graphs):
  - the bucket-1 graph replay alone (CUDA events): the GPU time of one decode step;
  - a bare chained loop (launch step t+1 fed step t's picks on the GPU, then read step t's picks back from a
    pinned copy queued behind its argmax): host launch time, wait, and the step period;
  - the real Scheduler on one greedy request, instrumented: the spacing of its steps and the host time of
    each part of its loop;
  - with --streams N instead: N greedy requests at once, the engine thread's own time by function (cProfile);
  - a mixed step (a 448-token prompt chunk joining 64 decoding streams, run eagerly): its wall time and where
    the host's time goes in it (cProfile, by each function's own time).
The step period should equal the replay time: then the host's work is hidden behind the GPU's.

    python3 scripts/profile_scheduler_step.py --checkpoint /tmp/ck20      # a gpt-oss checkpoint folder
    python3 scripts/profile_scheduler_step.py --checkpoint /tmp/ck20 --streams 64   # the engine thread at 64 streams
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubrick.engine.api import Finished, Message, SamplingParams  # noqa: E402
from kubrick.engine.engine import Engine  # noqa: E402
from kubrick.engine.scheduler import Scheduler  # noqa: E402


def gpu_ms(fn, n: int = 100) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def p50(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] * 1e3


def bare_chain(engine: Engine, steps: int = 300) -> None:
    vocab = engine.config.vocab_size
    prompt = list(range(1000, 1128))
    seq = engine.paged.admit(prompt, len(prompt) + steps + 20, engine.step_tokens)
    picks = engine.forward_batch([(seq, prompt)])[:, :vocab].argmax(-1)
    previous, laps = None, collections.defaultdict(list)
    for i in range(steps):
        t0 = time.perf_counter()
        logits = engine.forward_batch([(seq, [0])], device_tokens=picks)
        t1 = time.perf_counter()
        picks = logits[:, :vocab].argmax(-1)
        host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
        host.copy_(picks, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        if previous is not None:
            previous[1].synchronize()
            previous[0].tolist()
        previous = (host, ready)
        t2 = time.perf_counter()
        if i >= 20:
            laps["launch"].append(t1 - t0)
            laps["wait"].append(t2 - t1)
            laps["period"].append(t2 - t0)
    engine.paged.release(seq)
    print("bare chained loop: " + ", ".join(f"{k} p50 {p50(v):.3f} ms" for k, v in laps.items()))


def instrumented_scheduler(engine: Engine, max_tokens: int = 400) -> None:
    scheduler = Scheduler(engine)
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return call

    for name in ("_chain", "_resolve_inflight", "_flush_pending", "_take_picks", "_admit"):
        setattr(scheduler, name, timed(name, getattr(scheduler, name)))
    starts, forward = [], engine.forward_batch

    def counted(segments, **kwargs):
        starts.append(time.perf_counter())
        return timed("engine.forward_batch", forward)(segments, **kwargs)

    engine.forward_batch = counted
    done, finished = threading.Event(), []

    def on_event(event):
        if isinstance(event, Finished):
            finished.append(event)
            done.set()

    try:
        scheduler.submit([Message("user", "Tell me a story")], SamplingParams(temperature=0, max_tokens=max_tokens), on_event)
        done.wait(120)
    finally:
        scheduler.stop()
        del engine.forward_batch
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    print(f"scheduler: {finished[0].usage.completion_tokens} tokens, {len(starts)} steps, step spacing p50 "
          f"{p50(gaps):.3f} ms; host time a step:")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<22} {seconds * 1e3 / len(starts):.3f} ms")


def many_streams(engine: Engine, streams: int, max_tokens: int = 300, seconds: float = 2.0) -> None:
    """`streams` greedy requests at once through the real Scheduler: once every one is decoding, the engine
    thread's own time by function for `seconds` (cProfile of its loop iterations: the host work a decode step of
    that many streams costs, which the server's response thread waits on for the interpreter lock)."""
    scheduler = Scheduler(engine)
    profiler, on, iterations = cProfile.Profile(), threading.Event(), [0]
    real = scheduler._iteration

    def iteration():
        if not on.is_set():
            return real()
        iterations[0] += 1
        return profiler.runcall(real)

    scheduler._iteration = iteration
    finished, texts = [], collections.Counter()

    def on_event(i):
        def call(event):
            if isinstance(event, Finished):
                finished.append(event)
            else:
                texts[i] += 1
        return call

    try:
        for i in range(streams):
            scheduler.submit([Message("user", f"Tell me story number {i}")],
                             SamplingParams(temperature=0, max_tokens=max_tokens), on_event(i))
        deadline = time.time() + 60
        while len(texts) < streams and time.time() < deadline:  # every stream has its first text
            time.sleep(0.01)
        on.set()
        start = time.perf_counter()
        time.sleep(seconds)
        on.clear()
        wall = time.perf_counter() - start
    finally:
        scheduler.stop()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(f"{streams} streams: {iterations[0]} engine iterations in {wall:.2f} s ({wall / max(iterations[0], 1) * 1e3:.2f} "
          "ms each); the engine thread's time by function (under cProfile):")
    print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))


def mixed_step(engine: Engine, batch: int = 64, chunk: int = 448, runs: int = 5) -> None:
    cache = engine.paged
    seqs = [cache.admit(list(range(1000 + i, 1128 + i)), 256, engine.step_tokens) for i in range(batch)]
    for seq in seqs:
        engine.forward_batch([(seq, seq.tokens[:128])])
    newcomer = list(range(3000, 3000 + chunk))

    def step():
        seq = cache.admit(newcomer, chunk + 64, engine.step_tokens)
        engine.forward_batch([(s, [5]) for s in seqs] + [(seq, newcomer)])
        torch.cuda.synchronize()
        cache.release(seq)

    step()
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    for seq in seqs:
        cache.release(seq)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    print(f"mixed step ({batch} decodes + a {chunk}-token chunk, eager): wall p50 {p50(walls):.1f} ms; "
          "host time by function (one step, under cProfile):")
    print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--streams", type=int, help="only the many-streams profile, with this many requests at once")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_scheduler_step: needs a CUDA GPU")
    engine = Engine(args.checkpoint, device=args.device, context_length=args.context_length)
    if args.streams:
        many_streams(engine, args.streams)
        return 0
    decoder = engine.model.paged_decoder
    print(f"bucket-1 graph replay: {gpu_ms(lambda: decoder.graphs[1].replay()):.3f} ms "
          f"(table width {decoder.max_blocks} blocks)")
    bare_chain(engine)
    instrumented_scheduler(engine)
    mixed_step(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
