#!/usr/bin/env python3
"""The MoE decode GEMV at one token, launched eagerly over 8 layer copies, for Nsight Compute's counters.

    ncu --clock-control none -k regex:mlp --launch-skip 8 --launch-count 4 --section SpeedOfLight \
        --section Occupancy --section SchedulerStats --section WarpStateStats --section LaunchStats \
        python3 scripts/ncu_moe_gemv.py

(`--clock-control none`: the device's METHOD.md asks to leave the clocks alone.) The first 8 launches (one
pass over the copies, compiling) are skipped; the 4 profiled are mlp1 and mlp2 of two layers.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bench  # noqa: E402  (its random experts and routing)

from kubrick.engine.kernels.moe_gemv import gemv_input, moe_gemv  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("ncu_moe_gemv: needs a CUDA GPU")
    experts = bench.moe_weights(8)
    x = torch.randn(1, bench.HIDDEN, device="cuda", dtype=torch.bfloat16)
    x_gemv = gemv_input(x)  # the table's layout (the half one on sm90)
    routes = [bench.routing(1, seed) for seed in range(8)]
    stream = torch.zeros(1, bench.HIDDEN, device="cuda", dtype=torch.float32)
    for _ in range(3):
        for route, weights in zip(routes, experts):
            moe_gemv(x, *route, *weights, x_gemv=x_gemv, out=stream)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
