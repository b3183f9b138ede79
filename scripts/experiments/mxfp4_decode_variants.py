#!/usr/bin/env python
"""Experiment (issue 5, 2026-11-24): two cheaper MXFP4 decodes against the one in use. Neither was kept.

The decode in use (kernels/_common.py, `_MXFP4_PTX`) takes 22 instructions for 8 codes: per half of a byte pair a
shift for the magnitudes, a shift and a mask for the signs, and a lop3 merging them. One lop3 can keep the bits of
(a | b) when a and b have zeros where the other's bits go, so:

  v1 (19 instructions): first codes lop3((t << 6) | (t << 12)) on t = [0, b1, 0, b0]; second codes from the
     word's high nibbles permuted to [b1, 0, b0, 0], whose signs already sit on bits 15 and 31, and one shr;
  v2 (21 instructions): the second codes as lop3((th << 2) | (th << 8)) on th = the high nibbles in [0, b1, 0, b0].

Both are exact (the PTX emulator of tests/kernels agrees bit for bit). Each variant runs in a process of its own
with its own Triton cache, the string swapped into the kernels before anything compiles.

  python scripts/experiments/mxfp4_decode_variants.py sass   # CPU: SASS instructions a code (sm90, offline)
  python scripts/experiments/mxfp4_decode_variants.py gpu    # sm90 GPU: the MoE's µs a layer, and its sums checked

Results: BENCHMARKS.md run 40, section 8.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE_BITS, OR_AND = "0x81C081C0", "0xA8"  # magnitudes on bf16 bits 6..8 and signs on 15, per half; (a | b) & c
HEAD = "{\n.reg .b32 t, a, b, hi, z, zero;\nmov.b32 z, 0x80008000;\nmov.b32 zero, 0;\nand.b32 hi, $4, 0xF0F0F0F0;\n"


def _v1_pair(pair: int, first: str, second: str, scale: str) -> str:
    low, high = f"0x4{2 * pair + 1}4{2 * pair}", f"0x{2 * pair + 1}4{2 * pair}4"
    return (f"prmt.b32 t, $4, zero, {low};\nshl.b32 a, t, 6;\nshl.b32 b, t, 12;\n"
            f"lop3.b32 a, a, b, {CODE_BITS}, {OR_AND};\nfma.rn.bf16x2 {first}, a, {scale}, z;\n"
            f"prmt.b32 t, hi, zero, {high};\nshr.b32 a, t, 6;\n"
            f"lop3.b32 a, a, t, {CODE_BITS}, {OR_AND};\nfma.rn.bf16x2 {second}, a, {scale}, z;\n")


def _v2_pair(pair: int, first: str, second: str, scale: str) -> str:
    selector, code = f"0x4{2 * pair + 1}4{2 * pair}", ""
    for source, out, mag, sign in (("$4", first, 6, 12), ("hi", second, 2, 8)):
        code += (f"prmt.b32 t, {source}, zero, {selector};\nshl.b32 a, t, {mag};\nshl.b32 b, t, {sign};\n"
                 f"lop3.b32 a, a, b, {CODE_BITS}, {OR_AND};\nfma.rn.bf16x2 {out}, a, {scale}, z;\n")
    return code


def variant_ptx(name: str) -> str | None:
    """The decode string of a variant (None: the one in use)."""
    pair = {"v1": _v1_pair, "v2": _v2_pair}.get(name)
    if pair is None:
        return None
    return HEAD + pair(0, "$0", "$2", "$5") + pair(1, "$1", "$3", "$6") + "}"


def _swap_in(name: str) -> None:
    import triton.language as tl

    from kubrick.engine.kernels import _common, moe_wgmma

    ptx = variant_ptx(name)
    if ptx is not None:
        _common._MXFP4_PTX = moe_wgmma._MXFP4_PTX = tl.constexpr(ptx)


def _check(name: str) -> None:
    """Relative error of moe_wgmma's sums against the reference over tile shapes (BLOCK_M, BLOCK_N, SUB, STAGES)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from kernels.helpers import random_moe, rel_error

    from kubrick.engine.kernels import reference
    from kubrick.engine.kernels.moe_wgmma import moe_wgmma

    for block_m, block_n, sub, stages in [(64, 128, 1, 4), (64, 128, 1, 3), (64, 128, 1, 2), (64, 128, 3, 2),
                                          (64, 64, 1, 4), (32, 128, 1, 4), (16, 128, 1, 4), (16, 64, 1, 4),
                                          (64, 128, 3, 3)]:
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64, "STAGES": stages, "SUB": sub, "num_warps": 4}
        worst, bad, calls = 0.0, 0, 0
        for seed in range(8):
            x, ids, weights, w = random_moe(tokens=20, hidden=192, inter=192, experts=4, topk=2,
                                            dtype=torch.bfloat16, device=torch.device("cuda"), seed=seed)
            expected = reference.moe(x, ids, weights, *w)
            for _ in range(5):
                error = rel_error(moe_wgmma(x, ids, weights, *w, config=config), expected)
                worst, bad, calls = max(worst, error), bad + (error >= 1e-2), calls + 1
        print(f"{name} tiles {block_m}x{block_n}, {stages} stages of {sub}: worst rel. error {worst:.2e}, "
              f"{bad} of {calls} calls over 1e-2", flush=True)


def child(name: str, task: str, args: list[str]) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    if task == "sass":
        import sass_per_code  # sets TRITON_INTERPRET=0 before the kernel modules are imported

        _swap_in(name)
        sys.argv = ["sass_per_code.py", *args]
        sass_per_code.main()
        return
    _swap_in(name)
    if task == "time":
        import bench_kernels

        bench_kernels._sweep_moe(name, 8, (16, 64, 144, 512), lambda t: [("moe_grouped", bench_kernels.moe_grouped,
                                                                          None)])
    elif task == "check":
        _check(name)


def run(name: str, task: str, *args: str) -> None:
    with tempfile.TemporaryDirectory() as cache:  # a Triton cache per variant: no kernel of another is reused
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, __file__, "--child", name, task, *args], env=env, text=True,
                             capture_output=True, check=False)
        lines = [line.strip() if line.startswith(name) else f"{name}: {line.strip()}" for line in out.stdout.splitlines()
                 if any(key in line for key in ("instructions a code", "most used", " us ", "rel. error"))]
        print("\n".join(lines) if out.returncode == 0 else f"{name} {task} failed: {out.stderr[-600:]}", flush=True)


def exact(name: str) -> bool:
    """Whether a variant decodes every byte at every scale exactly as the one in use (the PTX emulator, CPU)."""
    import numpy as np

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from kernels import ptx_emulator

    from kubrick.engine.kernels._common import _MXFP4_PTX

    words = np.arange(2**16, dtype=np.uint32) * 0x00010001 ^ 0x5A5A0000  # every byte pair, both halves
    scales = [np.full(words.shape, (s + 63) << 7 | (s + 64) << 23, dtype=np.uint32) for s in (64, 127, 190)]
    return all(np.array_equal(a, b) for scale in scales
               for a, b in zip(ptx_emulator.run(variant_ptx(name), [words, scale, scale], 4),
                               ptx_emulator.run(_MXFP4_PTX.value, [words, scale, scale], 4)))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
        return 0
    if len(sys.argv) != 2 or sys.argv[1] not in ("sass", "gpu"):
        print("usage: mxfp4_decode_variants.py sass | gpu", file=sys.stderr)
        return 2
    names = ("table", "v1", "v2")
    if sys.argv[1] == "sass":
        for name in names[1:]:
            print(f"{name}: {'exact' if exact(name) else 'NOT exact'} against the decode in use (PTX emulator)")
        for kernel in (["wgmma-mlp2"], ["grouped-mlp2", "--block", "16,128,128"]):
            for name in names:
                run(name, "sass", *kernel)
        return 0
    for _ in range(2):
        for name in names:
            run(name, "time")
    for name in names:
        run(name, "check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
