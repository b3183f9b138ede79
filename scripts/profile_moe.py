#!/usr/bin/env python
"""Hardware counters of the MXFP4 MoE kernels at gpt-oss-20b's shape, for Nsight Compute (ncu).

One layer's random experts; the decode GEMV at 1 token and the grouped kernel at 64 tokens (a decode batch),
each compiled and run once before profiling starts, then once inside the profiled range:

  ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
      --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
      python3 scripts/profile_moe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import moe_weights, routing  # noqa: E402

from kubrick.engine.kernels.moe_gemv import moe_gemv  # noqa: E402
from kubrick.engine.kernels.moe_grouped import moe_grouped  # noqa: E402


def main() -> None:
    weights = moe_weights(1)[0]
    cases = []
    for tokens, fn in ((1, moe_gemv), (64, moe_grouped)):
        x = torch.randn(tokens, 2880, device="cuda", dtype=torch.bfloat16)
        cases.append((fn, x, routing(tokens, seed=tokens)))
    for fn, x, route in cases:  # compile outside the profiled range
        fn(x, *route, *weights)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for fn, x, route in cases:
        fn(x, *route, *weights)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
