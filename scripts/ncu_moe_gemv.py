#!/usr/bin/env python3
"""The MoE kernels launched eagerly over 8 layer copies, for Nsight Compute's counters: the decode GEMV at one
token (default), or the grouped kernels at --tokens under the table's tiles or a --config of moe_grouped.

    ncu --clock-control none -k regex:mlp --launch-skip 16 --launch-count 4 --section SpeedOfLight \
        --section Occupancy --section SchedulerStats --section WarpStateStats --section LaunchStats \
        python3 scripts/ncu_moe_gemv.py [--tokens 64 --config '{"BLOCK_M": 16, "BLOCK_N": 64}']

(`--clock-control none`: the device's METHOD.md asks to leave the clocks alone.) The first 16 launches (one
pass over the 8 copies, mlp1 and mlp2 each, compiling) are skipped; the 4 profiled are mlp1 and mlp2 of two
layers.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bench  # noqa: E402  (its random experts and routing)

from kubrick.engine.kernels.moe_gemv import gemv_input, moe_gemv  # noqa: E402
from kubrick.engine.kernels.moe_grouped import moe_grouped  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1, help="tokens a call (above 1: the grouped kernels)")
    parser.add_argument("--config", type=json.loads, default=None, help="moe_grouped's config (JSON)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ncu_moe_gemv: needs a CUDA GPU")
    experts = bench.moe_weights(8)
    x = torch.randn(args.tokens, bench.HIDDEN, device="cuda", dtype=torch.bfloat16)
    routes = [bench.routing(args.tokens, seed) for seed in range(8)]
    stream = torch.zeros(args.tokens, bench.HIDDEN, device="cuda", dtype=torch.float32)
    if args.tokens == 1:
        x_gemv = gemv_input(x)  # the table's layout (the half one on sm90)
        call = lambda route, weights: moe_gemv(x, *route, *weights, x_gemv=x_gemv, out=stream)  # noqa: E731
    else:
        config = bench.explicit(args.config) if args.config else None
        call = lambda route, weights: moe_grouped(x, *route, *weights, config=config, out=stream)  # noqa: E731
    for _ in range(3):
        for route, weights in zip(routes, experts):
            call(route, weights)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
