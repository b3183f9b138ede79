"""Shared pieces of the Triton kernels: interpreter detection, the per-architecture block-size table, MXFP4 decoding."""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1): small blocks, fp32 dots."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Block sizes per GPU family, keyed by the first matching (major, minor) prefix of the compute capability.
# Why they differ: sm80/sm90/sm100 have ~228 KB shared memory per SM and many SMs; sm86/sm89/sm120 (consumer
# parts) have ~100 KB, so the tl.dot kernels use fewer pipeline stages there. The GEMV kernels only stream
# weights through registers and use the same shapes everywhere. "interp" is for TRITON_INTERPRET=1 (CPU):
# small tiles keep the interpreter fast.
#   moe_gemv: BLOCK_I (mlp1 output pairs per program), BLOCK_N (mlp2 rows), BLOCK_K (values per step), warps
#   moe_grouped: BLOCK_M (token rows per expert tile), BLOCK_N, BLOCK_K, warps, stages (prefill), DOT_SCALED
#                (tl.dot_scaled on the packed weights instead of our dequantise + tl.dot; see moe_grouped.py);
#   moe_grouped_small: the same for at most SMALL_PAIRS (token, expert) pairs, where tiles are mostly empty
#   attn_prefill: BLOCK_M, BLOCK_N, warps, stages;  attn_decode: BLOCK_N, warps, stages
#   linear_gemv: BLOCK_N (rows of W per program), BLOCK_K, warps (kernels/linear.py, one token)
_TABLE: dict[str, dict[str, dict[str, int | str]]] = {
    "interp": {
        "moe_gemv": dict(BLOCK_I=16, BLOCK_N=16, BLOCK_K=64, num_warps=4),
        "moe_grouped": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1),
        "moe_grouped_small": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1),
        "attn_prefill": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "attn_decode": dict(BLOCK_N=16, num_warps=4, num_stages=1),
        "linear_gemv": dict(BLOCK_N=16, BLOCK_K=32, num_warps=4),
    },
    "big_smem": {  # sm80 (A100), sm90 (H100/H200), sm100 (B200); MoE entries: best of the H100 sweeps
        # (moe_gemv: `bench_kernels.py --sweep-gemv`, 38.1 us a layer at 1 token, BLOCK_K 1024 spills)
        "moe_gemv": dict(BLOCK_I=4, BLOCK_N=16, BLOCK_K=512, num_warps=4),
        "moe_grouped": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
        "moe_grouped_small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
        "attn_prefill": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "attn_decode": dict(BLOCK_N=64, num_warps=4, num_stages=2),
        # H100 `bench_kernels.py --sweep-linear`: 10.3 / 12.6 us (out / QKV) against cuBLAS + add 14.9 / 14.7
        "linear_gemv": dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4),
    },
    "sm90": {},  # H100/H200: big_smem with the grouped MoE on tl.dot_scaled (filled in below)
    "small_smem": {  # sm86/sm89 (RTX 30/40, L4, L40), sm120 (RTX 50, RTX PRO 6000)
        "moe_gemv": dict(BLOCK_I=8, BLOCK_N=16, BLOCK_K=512, num_warps=4),
        "moe_grouped": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2),
        "moe_grouped_small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2),
        "attn_prefill": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        "attn_decode": dict(BLOCK_N=64, num_warps=4, num_stages=2),
        "linear_gemv": dict(BLOCK_N=8, BLOCK_K=512, num_warps=4),
    },
}


# On the H100 the grouped MoE kernels run faster on tl.dot_scaled (the packed bytes and E8M0 scales handed to
# Triton's MXFP4 dot as stored) than on our own dequantise-then-tl.dot: per layer 335 vs 425 us at 8 tokens,
# 462 vs 686 at 64, 2094 vs 3788 at 2048 (BENCHMARKS.md, `bench_kernels.py --sweep`). Only measured there, so
# only used there: other GPUs keep the tested tl.dot path, which the CPU interpreter (no dot_scaled) also runs.
_TABLE["sm90"] = _TABLE["big_smem"] | {
    "moe_grouped": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, DOT_SCALED=True),
    "moe_grouped_small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, DOT_SCALED=True),
}


@lru_cache(maxsize=None)
def _family(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) == (9, 0):
        return "sm90"
    if (major, minor) == (8, 0) or major == 10:
        return "big_smem"
    return "small_smem"


def block_config(kernel: str, device: torch.device) -> dict:
    """The block sizes of `kernel` for the GPU family of `device` (a copy: callers may override entries)."""
    if interpreting() or device.type != "cuda":
        family = "interp"
    else:
        family = _family(device.index if device.index is not None else torch.cuda.current_device())
    return dict(_TABLE[family][kernel])


@lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def round_to_bf16(x):
    """float32 -> the nearest bf16 (ties to even), still as float32. By hand because the 3.6 interpreter's
    .to(tl.bfloat16) truncates; compiled, this is what the conversion does."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e2m1_over_16384(nibble):
    """Decode E2M1 fp4 codes (int32 0..15) to float32, divided by 2**14 (callers fold 2**14 into the scale).

    The 3 magnitude bits land on fp16 exponent/mantissa bits 11..9 and the sign on bit 15: for exponent 0
    this is an fp16 subnormal, so every code (0, 0.5 … 6) comes out exactly, with no lookup table.
    """
    bits = ((nibble & 8) << 12) | ((nibble & 7) << 9)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e8m0_times_16384(scale):
    """Decode E8M0 scales (int32 0..255) to 2**(s-127) * 2**14 in float32, the partner of e2m1_over_16384."""
    return (scale << 23).to(tl.float32, bitcast=True) * 16384.0
