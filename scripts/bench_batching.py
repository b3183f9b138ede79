#!/usr/bin/env python
"""Continuous-batching benchmark in-process (the real scheduler and engine, no server, no HTTP).

1. Throughput: N concurrent greedy requests through the scheduler (batched) against the same requests served
   one after another by Engine.generate; output tokens/s, and the step time a decoding stream waits between
   two tokens (p50/p99: each step of the batch is one inter-token gap for every decoding stream).
2. The step-time bound: streams decoding while one long prompt arrives; for each --step-tokens setting,
   the longest step (the worst gap the other streams see) and the long prompt's time to first token.

  python scripts/bench_batching.py                       # tiny random model on the CPU (made once)
  python scripts/bench_batching.py --checkpoint DIR --device cuda --impl reference
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

from kubrick.engine.api import EngineError, Finished, Message, SamplingParams
from kubrick.engine.engine import Engine
from kubrick.engine.scheduler import Scheduler

PROMPTS = [
    "Explain how a bicycle stays upright.",
    "Write a short poem about the sea at night.",
    "What is the difference between a list and a tuple in Python?",
    "Give me three ideas for a rainy Sunday.",
]


def timed_steps(engine: Engine) -> list[tuple[float, int]]:
    """Record (seconds since the step before, segments) of every batched step the engine runs."""
    steps, forward, last = [], engine.forward_batch, []

    def timed(segments, **kwargs):
        # From one step's start to the next: with chained steps forward_batch returns before the GPU is done,
        # so the spacing of the starts, not a call's length, is the step time a stream sees.
        now = time.perf_counter()
        if last:
            steps.append((now - last[0], len(segments)))
        last[:] = [now]
        return forward(segments, **kwargs)

    engine.forward_batch = timed
    return steps


def run_batch(engine: Engine, requests: list[tuple[list[Message], SamplingParams]], chain: bool = True) -> tuple[float, int]:
    """(wall seconds, completion tokens) for all requests submitted at once."""
    scheduler = Scheduler(engine, chain=chain)
    done, finished = threading.Semaphore(0), []

    def on_event(event):
        if isinstance(event, (Finished, EngineError)):
            finished.append(event)
            done.release()

    start = time.perf_counter()
    for messages, params in requests:
        scheduler.submit(messages, params, on_event)
    for _ in requests:
        done.acquire()
    wall = time.perf_counter() - start
    scheduler.stop()
    bad = [e for e in finished if not isinstance(e, Finished)]
    if bad:
        raise SystemExit(f"a request failed: {bad[0]}")
    return wall, sum(e.usage.completion_tokens for e in finished)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def throughput(engine: Engine, clients: list[int], max_tokens: int, one_at_a_time: bool = True,
               chain: bool = True) -> list[str]:
    rows = ["| streams | batched tok/s | one at a time tok/s | step p50 ms | step p99 ms |", "|---|---|---|---|---|"]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for n in clients:
        requests = [([Message("user", f"{PROMPTS[i % len(PROMPTS)]} ({i})")], params) for i in range(n)]
        engine.paged.drop_cached()
        steps = timed_steps(engine)
        wall, tokens = run_batch(engine, requests, chain)
        del engine.forward_batch  # back to the class's method
        serial = "not run"
        if one_at_a_time:
            start, serial_tokens = time.perf_counter(), 0
            for messages, p in requests:
                serial_tokens += [e for e in engine.generate(messages, p) if isinstance(e, Finished)][0].usage.completion_tokens
            serial = f"{serial_tokens / (time.perf_counter() - start):.1f}"
        decode_steps = [s for s, _ in steps]
        rows.append(
            f"| {n} | {tokens / wall:.1f} | {serial} | "
            f"{percentile(decode_steps, 50) * 1e3:.1f} | {percentile(decode_steps, 99) * 1e3:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def step_bound(checkpoint, device, impl, step_settings: list[int], prompt_tokens: int, streams: int) -> list[str]:
    rows = [
        f"| step_tokens | longest step ms (the worst gap for {streams} decoding streams) | median step ms | "
        f"TTFT of the {prompt_tokens}-token prompt s |",
        "|---|---|---|---|",
    ]
    for step_tokens in step_settings:
        engine = Engine(
            checkpoint, device=device, context_length=prompt_tokens + 1024, implementation=impl, step_tokens=step_tokens, max_batch=16
        )
        scheduler = Scheduler(engine)
        runners = []
        for i in range(streams):
            first = threading.Event()
            runners.append((scheduler.submit([Message("user", PROMPTS[i % 4])], SamplingParams(temperature=0, max_tokens=100_000 // 100), lambda e, f=first: f.set()), first))
        for _, first in runners:
            first.wait(300)
        steps = timed_steps(engine)
        got_first, sent = threading.Event(), time.perf_counter()
        first_at = []

        def on_long(event):
            if not first_at:
                first_at.append(time.perf_counter())
                got_first.set()

        long_handle = scheduler.submit([Message("user", "word " * (prompt_tokens - 80))], SamplingParams(temperature=0, max_tokens=1), on_long)
        got_first.wait(3600)
        ttft = first_at[0] - sent
        during = [s for s, _ in steps]
        long_handle.cancel()
        scheduler.stop()
        rows.append(f"| {step_tokens} | {max(during) * 1e3:.0f} | {percentile(during, 50) * 1e3:.0f} | {ttft:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: a tiny random checkpoint, made once")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--impl", default="reference")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--step-tokens", default="64,256,512", help="step_tokens settings of the step-bound table ('' skips it)")
    parser.add_argument("--chain", action=argparse.BooleanOptionalAction, default=True,
                        help="queue greedy decode steps behind each other (the scheduler's default)")
    parser.add_argument("--one-at-a-time", action=argparse.BooleanOptionalAction, default=True,
                        help="also serve the same requests one after another through Engine.generate")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 keeps figures steady on a busy machine)")
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from kubrick.engine.make_checkpoint import make_checkpoint

        checkpoint = Path(tempfile.gettempdir()) / "kubrick-bench-tiny"
        if not checkpoint.exists():
            make_checkpoint(checkpoint, preset="tiny", seed=0)
    engine = Engine(checkpoint, device=args.device, context_length=4096, implementation=args.impl)
    print(engine.kv_cache_description(), flush=True)
    table1 = throughput(engine, [int(c) for c in args.clients.split(",")], args.max_tokens, args.one_at_a_time, args.chain)
    del engine
    settings = [int(s) for s in args.step_tokens.split(",") if s]
    table2 = step_bound(checkpoint, args.device, args.impl, settings, args.long_prompt, 4) if settings else []
    if args.record:
        with args.record.open("a") as out:
            out.write(
                f"\n## In-process batching, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
                f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the end)\n\nCommand: `python {' '.join(sys.argv)}` "
                f"(greedy, max_tokens {args.max_tokens}, prompts of ~77 tokens, {__import__('torch').get_num_threads()} torch threads)\n\n"
                + "\n".join(table1) + "\n\n" + "\n".join(table2) + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
