#!/usr/bin/env python
"""When each kernel of the batch-1 graph step starts and ends (issue 5): under programmatic dependent launch a
kernel's programs may start before the one before it ends, and what a kernel can load ahead of its wait depends on
how early that is. torch.profiler over 4 replays at context 128; prints, for the third step's first layers, each
kernel's start and end in µs from the step's first kernel, and how far its start lies before the end of the kernel
before it (its head start). On a GPU:

    python3 scripts/experiments/kernel_starts.py [layers, default 2]

OVERRIDE='KERNEL={json}' in the environment merges an entry into that kernel's sm90 block-table entry first
(as table_decode_ab.sh does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bench_decode  # noqa: E402
import bench_kernels  # noqa: E402

STEPS = 4


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    if os.environ.get("OVERRIDE"):
        bench_decode.override_table(os.environ["OVERRIDE"])
    config, model = bench_kernels.random_20b_model()
    decoder, _cache, token = bench_decode.graph_decoder(model, config, 128, 128 + 64)
    state = {"token": token}

    def step():
        state["token"] = decoder.step(state["token"])[-1].argmax().view(1)

    kernels = bench_decode.profiled_kernels(step, STEPS)
    per_step = len(kernels) // STEPS
    third = kernels[2 * per_step: 3 * per_step]
    t0 = third[0]["ts"]
    print(f"{per_step} kernels a step; step 3 spans {third[-1]['ts'] + third[-1]['dur'] - t0:.1f} us")
    print(f"{'kernel':48s} {'start':>8s} {'end':>8s} {'dur':>7s} {'head start':>10s}")
    previous_end = None
    for e in third[: 2 + 7 * layers]:
        start, end = e["ts"] - t0, e["ts"] + e["dur"] - t0
        head = "" if previous_end is None else f"{previous_end - start:10.2f}"
        print(f"{e['name'][:48]:48s} {start:8.2f} {end:8.2f} {e['dur']:7.2f} {head}")
        previous_end = end


if __name__ == "__main__":
    main()
