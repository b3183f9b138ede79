"""Engine A/B of the moe_wgmma_small entry (8-pair Gluon tiles up to 32 tokens, the GEMV up to 8): the static
batched decode graph at 10-64 sequences, alternating the entry off (MAX_PAIRS 0, the GEMV up to 10 tokens, as
before run 45) and on, twice; at context 1024 over 32 steps, then as bench_engine.py runs it (context 128, 512
steps). Run on an H100 from the repository root:

  python3 scripts/experiments/moe_small_tiles_ab.py
"""

import sys

sys.path.insert(0, "scripts")

import bench_engine  # noqa: E402
import bench_kernels  # noqa: E402
from kubrick.engine.kernels import _common  # noqa: E402

SM90 = _common._TABLE["sm90"]
ON = (SM90["moe_wgmma_small"]["MAX_PAIRS"], SM90["moe_gemv"]["MAX_PAIRS"])
OFF = (0, 40)


def main() -> None:
    config, model = bench_kernels.random_20b_model()
    for context, steps in ((1024, 32), (128, 512)):
        for _ in range(2):
            for label, (small, gemv) in (("off", OFF), ("on", ON)):
                SM90["moe_wgmma_small"]["MAX_PAIRS"], SM90["moe_gemv"]["MAX_PAIRS"] = small, gemv
                rows = bench_engine.decode_batched(model, config, [10, 16, 32, 48, 64], context, steps)
                print(f"{label} ctx {context} steps {steps}", "  ".join(f"b{row['batch']} {row['tok_s']:.0f}"
                                                                       for row in rows), flush=True)


if __name__ == "__main__":
    main()
