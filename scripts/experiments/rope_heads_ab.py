#!/usr/bin/env python
"""A/B (issue 6, 2026-11-24): RoPE + KV write with one head of a token a program (as before cae2298) against 16
heads a program (kernels/rope.py since), in one process, alternating: the mixed step and the paged decode step at
64 (bench_engine.decode_paged), the Engine's prefill in steps of 512, and the static prefill of 2,048 tokens.
Results: BENCHMARKS.md run 42, section 2.

    python3 scripts/experiments/rope_heads_ab.py      # on the GPU machine (random 20b weights, ~1 minute)
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

import bench_engine
import bench_kernels

from kubrick.engine.fast_model import GraphedFastTransformer
from kubrick.engine.kernels import rope

config, weights = bench_kernels.random_20b_weights()
model = GraphedFastTransformer(config, weights)
for variant in ("16 heads", "1 head", "16 heads", "1 head"):
    rope.HEADS_FROM = 16 if variant == "16 heads" else 1 << 30  # read at each call, so at each graph capture too
    paged = bench_engine.decode_paged(model, config, [64], 128, 32)[0]
    one_chunk = bench_engine.prefill(model, config, 2048, 2048)
    chunks = bench_engine.prefill(model, config, 2048, 512)
    print(f"{variant} a program: mixed step {paged['mixed_step_s'] * 1e3:.2f} ms (eager "
          f"{paged['mixed_step_eager_s'] * 1e3:.2f}), paged decode 64 {paged['tok_s']:.0f} tok/s, forward_batch "
          f"prefill 2048 in 512s {2048 / paged['prefill_2048_in_steps_s']:.0f} tok/s, static prefill 2048 "
          f"{2048 / one_chunk:.0f} / in 512s {2048 / chunks:.0f} tok/s  {time.strftime('%H:%M:%S')}", flush=True)
