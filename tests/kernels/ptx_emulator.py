"""A small emulator of the PTX subset our inline-asm decodes use, so CI (no GPU) can check their bit logic.

It runs an `inline_asm_elementwise` string over numpy arrays of 32-bit words, one lane per element: mov, and,
shl, shr, prmt (default mode), lop3 and fma.rn.bf16x2, each as the PTX ISA defines it. It is a test double for
the GPU, not the GPU: the GPU tests run the same strings on the hardware.
"""

from __future__ import annotations

import re

import numpy as np


def _bf16_to_float(half: np.ndarray) -> np.ndarray:
    return (half.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _float_to_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> bf16 bits, rounded to nearest even (through float32, exact for the products checked here)."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    return (bits >> 16).astype(np.uint32)


def _prmt(a: np.ndarray, b: np.ndarray, selector: int) -> np.ndarray:
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = source[nibble & 7]
        if nibble & 8:  # sign-replicate mode: the selected byte's top bit across the byte
            byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
        out |= byte << (8 * i)
    return out


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, table: int) -> np.ndarray:
    out = np.zeros_like(a)
    for index in range(8):  # index = 4a + 2b + c per bit
        if table >> index & 1:
            pick_a = a if index & 4 else ~a
            pick_b = b if index & 2 else ~b
            pick_c = c if index & 1 else ~c
            out |= pick_a & pick_b & pick_c
    return out


def _fma_bf16x2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    out = np.zeros_like(a)
    for shift in (0, 16):
        values = [_bf16_to_float((v >> shift) & 0xFFFF) for v in (a, b, c)]
        out |= _float_to_bf16(values[0] * values[1] + values[2]) << shift
    return out


def run(asm: str, args: list[np.ndarray], outputs: int) -> list[np.ndarray]:
    """Run `asm` (operands $0 .. $outputs-1 written, the rest read from `args`, all uint32) -> the outputs."""
    regs: dict[str, np.ndarray] = {f"${outputs + i}": np.asarray(a, dtype=np.uint32) for i, a in enumerate(args)}
    shape = regs[f"${outputs}"].shape

    def value(token: str) -> np.ndarray:
        if token in regs:
            return regs[token]
        return np.full(shape, int(token, 0) & 0xFFFFFFFF, dtype=np.uint32)

    for line in asm.replace("{", "\n").replace("}", "\n").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *srcs = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            result = value(srcs[0]).copy()
        elif op == "and.b32":
            result = value(srcs[0]) & value(srcs[1])
        elif op == "shl.b32":
            result = (value(srcs[0]).astype(np.uint64) << int(srcs[1], 0)).astype(np.uint32)
        elif op == "shr.b32":
            result = value(srcs[0]) >> np.uint32(int(srcs[1], 0))
        elif op == "prmt.b32":
            result = _prmt(value(srcs[0]), value(srcs[1]), int(srcs[2], 0))
        elif op == "lop3.b32":
            result = _lop3(value(srcs[0]), value(srcs[1]), value(srcs[2]), int(srcs[3], 0))
        elif op == "fma.rn.bf16x2":
            result = _fma_bf16x2(value(srcs[0]), value(srcs[1]), value(srcs[2]))
        else:
            raise NotImplementedError(f"the PTX emulator has no {op!r} (line {line!r})")
        if not re.fullmatch(r"\$?\w+", dst):
            raise ValueError(f"unexpected destination {dst!r}")
        regs[dst] = result.astype(np.uint32)
    return [regs[f"${i}"] for i in range(outputs)]
