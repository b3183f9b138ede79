"""The Gluon MoE's decode tiles at 8 against 16 pairs (BLOCK_M), beside the decode GEMV, at 9-48 tokens.

Run on an H100 from the repository root: `python3 scripts/experiments/blockm_sweep.py` (8 layers of random 20b
experts, µs a layer; BENCHMARKS.md run 45 has the figures behind the moe_wgmma_small entry of the block table).
"""

import sys

sys.path.insert(0, "scripts")

import bench_kernels as b  # noqa: E402
from kubrick.engine.kernels.moe_gemv import moe_gemv  # noqa: E402
from kubrick.engine.kernels.moe_wgmma import moe_wgmma  # noqa: E402

BASE = dict(BLOCK_K=64, num_warps=4)
TILES = [(16, 64, 2, 5), (8, 64, 2, 5), (8, 64, 3, 5), (8, 128, 2, 5), (8, 64, 2, 3)]  # BLOCK_M, BLOCK_N, STAGES, SUB


def runs(tokens):
    gemv = [("moe_gemv", moe_gemv, None)] if tokens <= 12 else []
    return gemv + [("moe_wgmma", moe_wgmma, BASE | dict(BLOCK_M=m, BLOCK_N=n, STAGES=st, SUB=sub))
                   for m, n, st, sub in TILES]


if __name__ == "__main__":
    b._sweep_moe("blockm", 8, (9, 10, 12, 16, 24, 32, 40, 48, 64), runs)
