#!/usr/bin/env python
"""Summarise a scheduler step trace (KUBRICK_STEP_TRACE, see kubrick/engine/step_trace.py).

Every stream that is decoding gets its next text at each "deliver" event, so the time between two deliveries
is the inter-token gap those streams see. This prints those gaps (p50/p99/max), the host time of each kind of
step launch and of the waits for picks, the Triton compiles the steps ran into, and, for the longest gaps,
the events inside them.

    python scripts/step_trace.py TRACE.jsonl [--worst 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def spread(values: list[float]) -> str:
    return (f"n {len(values):6d}  p50 {percentile(values, 50):7.2f}  p99 {percentile(values, 99):7.2f}  "
            f"max {max(values, default=float('nan')):7.2f}  mean {sum(values) / max(len(values), 1):7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--worst", type=int, default=8, help="how many of the longest gaps to take apart")
    args = parser.parse_args()
    try:
        events = [json.loads(line) for line in args.trace.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        sys.exit(f"step_trace: cannot read {args.trace}: {err}")
    if not events:
        sys.exit(f"step_trace: {args.trace} holds no events (lines are written every 512 events and when the "
                 "server stops)")
    if not all(isinstance(e, dict) and {"ev", "t", "ms"} <= e.keys() for e in events):
        sys.exit(f"step_trace: {args.trace} is not a KUBRICK_STEP_TRACE file (each line needs ev, t and ms)")
    events.sort(key=lambda e: e["t"])
    launches = defaultdict(list)
    for e in events:
        if e["ev"] == "launch":
            launches[e["kind"]].append(e["ms"])
    print("host time, ms:")
    for kind, times in sorted(launches.items()):
        print(f"  launch {kind:8s} {spread(times)}")
    print(f"  wait for picks  {spread([e['ms'] for e in events if e['ev'] == 'wait'])}")
    print(f"  deliver         {spread([e['ms'] for e in events if e['ev'] == 'deliver'])}")
    admits = [e["ms"] for e in events if e["ev"] == "admit"]
    if admits:  # traces before the admit event lack it
        print(f"  admit           {spread(admits)}")
    pauses = [e["ms"] for e in events if e["ev"] == "gc"]
    if pauses:
        print(f"  garbage collector pauses (>= 1 ms) {spread(pauses)}")
    compiles = defaultdict(list)
    for e in events:
        if e["ev"] == "compile":
            compiles[e["kernel"]].append(e["ms"])
    if compiles:
        print("Triton compiles (kernel: how many, ms in all):")
        for kernel, times in sorted(compiles.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {kernel}: {len(times)}, {sum(times):.0f} ms")
    delivers = [e for e in events if e["ev"] == "deliver"]
    responds = [e for e in events if e["ev"] == "respond"]
    if responds:  # a trace of the Triton server: its response thread's sends
        print(f"  respond (server) {spread([e['ms'] for e in responds])}; responses a batch "
              f"{spread([e['n'] for e in responds])}")
        ends = sorted(e["t"] + e["ms"] / 1e3 for e in responds)
        lags = []  # a delivery's end -> the end of the first send batch after it: text waiting on the server
        for d in delivers:
            done = d["t"] + d["ms"] / 1e3
            later = next((end for end in ends if end >= done), None)  # (linear: traces are short)
            if later is not None:
                lags.append((later - done) * 1e3)
        print(f"  delivered -> sent {spread(lags)}")
        gaps_sent = [(b - a) * 1e3 for a, b in zip(ends, ends[1:])]
        print(f"gaps between send batches, ms: {spread(gaps_sent)}")
    gaps = [(b["t"] - a["t"], a, b) for a, b in zip(delivers, delivers[1:])]
    print(f"gaps between deliveries, ms: {spread([g * 1e3 for g, _, _ in gaps])}")
    print(f"the {args.worst} longest, with what ran inside them (t in ms from the earlier delivery):")
    for gap, a, b in sorted(gaps, key=lambda g: -g[0])[: args.worst]:
        inside = [e for e in events if a["t"] <= e["t"] < b["t"]]
        parts = []
        for e in inside:
            what = (f"{e['kind']}({e['rows']} rows, {e['prefill']} prefill)" if e["ev"] == "launch"
                    else f"compile {e['kernel']}" if e["ev"] == "compile"
                    else f"gc(generation {e['generation']})" if e["ev"] == "gc" else e["ev"])
            parts.append(f"{(e['t'] - a['t']) * 1e3:.1f} {what} {e['ms']:.1f}")
        print(f"  {gap * 1e3:7.1f} ms: " + "; ".join(parts))


if __name__ == "__main__":
    main()
