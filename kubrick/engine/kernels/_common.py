"""Shared pieces of the Triton kernels: interpreter detection, the per-architecture block-size table, MXFP4 decoding."""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kubrick.engine.switches import switched_off


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1): small blocks, fp32 dots."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Block sizes per GPU family, keyed by the first matching (major, minor) prefix of the compute capability.
# Why they differ: sm80/sm90/sm100 have ~228 KB shared memory per SM and many SMs; sm86/sm89/sm120 (consumer
# parts) have ~100 KB, so the tl.dot kernels use fewer pipeline stages there. The GEMV kernels only stream
# weights through registers and use the same shapes everywhere. "interp" is for TRITON_INTERPRET=1 (CPU):
# small tiles keep the interpreter fast.
#   moe_gemv: BLOCK_I (mlp1 output pairs per program), BLOCK_N (mlp2 rows), BLOCK_K (values per step), warps,
#             MLP2 (mlp2's own BLOCK_N / BLOCK_K / warps), HALF (the half layout, see moe_gemv.py);
#             MAX_PAIRS: moe() takes the GEMV up to this many (token, expert) pairs, the grouped kernel above
#   moe_grouped: BLOCK_M (token rows per expert tile), BLOCK_N, BLOCK_K, warps, stages (prefill), DOT_SCALED
#                (tl.dot_scaled on the packed weights instead of our dequantise + tl.dot; see moe_grouped.py),
#                FAST_FP4 (our dequantise in inline PTX, see mxfp4_to_bf16 below);
#   moe_grouped_small: the same for at most MAX_PAIRS (token, expert) pairs (default moe_grouped.SMALL_PAIRS,
#             512), where tiles are mostly empty
#   attn_prefill: BLOCK_M, BLOCK_N, warps, stages;  attn_decode: BLOCK_N, warps, stages
#   linear_gemv: BLOCK_N (rows of W per program), BLOCK_K, warps, AHEAD (the first step of W loaded before the
#                PDL wait, default on; kernels/linear.py, one token)
#   moe_wgmma_small, moe_wgmma, moe_wgmma_mid: sm90's Gluon MoE (moe_wgmma.py): BLOCK_M pairs, BLOCK_N rows,
#              BLOCK_K, STAGES of SUB steps, warps; moe_grouped hands it calls of at most MAX_PAIRS pairs (0: never),
#              the first entry whose MAX_PAIRS holds the call
_TABLE: dict[str, dict[str, dict[str, int | str]]] = {
    "interp": {
        "moe_gemv": dict(BLOCK_I=16, BLOCK_N=16, BLOCK_K=64, num_warps=4, MAX_PAIRS=64),
        "moe_grouped": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1),
        "moe_grouped_small": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1),
        "attn_prefill": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "attn_decode": dict(BLOCK_N=16, num_warps=4, num_stages=1),
        "linear_gemv": dict(BLOCK_N=16, BLOCK_K=32, num_warps=4),
        "moe_wgmma_small": dict(MAX_PAIRS=0),  # sm90 only (Gluon compiles, never interprets)
        "moe_wgmma": dict(MAX_PAIRS=0),
        "moe_wgmma_mid": dict(MAX_PAIRS=0),
    },
    "big_smem": {  # sm80 (A100), sm90 (H100/H200), sm100 (B200); MoE entries: best of the H100 sweeps
        # (moe_gemv: `bench_kernels.py --sweep-gemv`, 38.1 us a layer at 1 token, BLOCK_K 1024 spills)
        # MAX_PAIRS: GEMV 199 / 283 / 368 us a layer vs grouped 340 / 389 / 434 us at 8 / 12 / 16 tokens
        "moe_gemv": dict(BLOCK_I=4, BLOCK_N=16, BLOCK_K=512, num_warps=4, MAX_PAIRS=64),
        "moe_grouped": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
        "moe_grouped_small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
        "attn_prefill": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        "attn_decode": dict(BLOCK_N=64, num_warps=4, num_stages=2),
        # H100 `bench_kernels.py --sweep-linear`: 10.3 / 12.6 us (out / QKV) against cuBLAS + add 14.9 / 14.7;
        # AHEAD: the first K step of W loaded before the PDL wait (with mlp2's and the router's loads ahead,
        # batch 1 +3.5 % over waiting first, and 2 steps did no better: BENCHMARKS.md run 35)
        "linear_gemv": dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4, AHEAD=True),
        "moe_wgmma_small": dict(MAX_PAIRS=0),  # measured on sm90 only
        "moe_wgmma": dict(MAX_PAIRS=0),
        "moe_wgmma_mid": dict(MAX_PAIRS=0),
    },
    "sm90": {},  # H100/H200: big_smem with the grouped MoE on FAST_FP4 and W_FIRST (filled in below)
    "small_smem": {  # sm86/sm89 (RTX 30/40, L4, L40), sm120 (RTX 50, RTX PRO 6000)
        "moe_gemv": dict(BLOCK_I=8, BLOCK_N=16, BLOCK_K=512, num_warps=4, MAX_PAIRS=64),
        "moe_grouped": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2),
        "moe_grouped_small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2),
        "attn_prefill": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        "attn_decode": dict(BLOCK_N=64, num_warps=4, num_stages=2),
        "linear_gemv": dict(BLOCK_N=8, BLOCK_K=512, num_warps=4),
        "moe_wgmma_small": dict(MAX_PAIRS=0),
        "moe_wgmma": dict(MAX_PAIRS=0),
        "moe_wgmma_mid": dict(MAX_PAIRS=0),
    },
}


# sm90 (H100/H200), measured only there, so used only there (other GPUs keep the plain tl.dot path, which the CPU
# interpreter also runs). All figures are per layer, from `bench_kernels.py` sweeps (BENCHMARKS.md).
# - Small steps: our inline-PTX decode (FAST_FP4) on tl.dot in 16-row tiles. It beat tl.dot_scaled (which took
#   the packed weights as stored, but whose MXFP4 upcast costs ~9 instructions a code against ~4.4): 287 / 295 /
#   297 / 400 us against 379 / 390 / 389 / 534 at 16 / 32 / 64 / 128 tokens (`--sweep-small`). Since run 37 the
#   Gluon kernels (moe_wgmma below) take these steps, and the GEMV keeps up to 8 tokens: at 9 / 10 tokens it took
#   153.4 / 167.1 us against the 8-pair Gluon tiles' 150.3 / 156.4 (H100, BENCHMARKS.md run 45; at 8 tokens run 37
#   had 139.8 against the 16-pair tiles' 154.5). The paged buckets are 8 and 16 rows, so only eager steps of 9-10
#   tokens see the handover.
# - Larger steps: FAST_FP4 with the weights as the dot's first operand (W_FIRST: wgmma's register operand, see
#   moe_grouped.py) in 64 x 64 x 32 tiles, which replaced dot_scaled's 128-row tiles (`--sweep-w-first`, H200,
#   2026-11-23): 410 / 605 / 986 / 1798 us against 545 / 855 / 1233 / 2045 at 256 / 512 / 1024 / 2048 tokens;
#   at 128 tokens the small table still wins (358 against 395). `--sweep-tables` (H200, 13:24 UTC): 388 / 412
#   against 397 / 398 us at 144 / 160 tokens, so MAX_PAIRS 576 (144 tokens). 128 x 64 x 64 tiles would take
#   another 11 % at 2048.
# - The decode GEMV on the half layout (HALF: fp16 activation pairs, f16x2 fmas in inline PTX; moe_gemv.py), whose
#   mlp1 takes 8 output pairs over 1024 values with 8 warps and mlp2 8 rows: 29.7 / 139.2 us a layer at 1 / 8
#   tokens against 36.0 / 191.2 on the float32 layout with its own best blocks (BENCHMARKS.md, run 33).
_TABLE["sm90"] = _TABLE["big_smem"] | {
    "moe_gemv": dict(BLOCK_I=8, BLOCK_K=1024, num_warps=8, MLP2=dict(BLOCK_N=8, BLOCK_K=512, num_warps=4),
                     MAX_PAIRS=4 * 8, HALF=True),
    "moe_grouped": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=5, FAST_FP4=True, W_FIRST=True,
                        MLP2=dict(BLOCK_N=128, num_warps=4)),
    # mlp2 (K = intermediate, N = hidden) on its own tile of 256 rows x 64 values: 279 vs 294 us at 64 tokens;
    # mlp1's gate and linear rows in one dot (ONE_DOT): 268 vs 279
    "moe_grouped_small": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, FAST_FP4=True,
                              ONE_DOT=True, MLP2=dict(BLOCK_N=256, BLOCK_K=64), MAX_PAIRS=4 * 144),
    # Gluon's wgmma with the decode written into its register operand, stages of 5 steps (160-byte runs of a row):
    # 205 / 233 / 304 / 341 us a layer against the small table's 256 / 269 / 366 / 396 at 16 / 64 / 128 / 144
    # tokens (`bench_kernels.py --sweeps-only --sweep-wgmma`, BENCHMARKS.md run 37); at 256 tokens and more these
    # tiles lose (499 against W_FIRST's 417), so they take the small table's range
    # Up to 32 tokens, tiles of 8 pairs (wgmma's N 8; half the activations' ring, so more programs an SM): 150.3 /
    # 192.3 / 208.3 / 221.8 against 16 pairs' 158.6 / 202.6 / 219.0 / 225.1 us a layer at 9 / 16 / 32 / 48 tokens,
    # but 257.5 against 229.1 at 64 (experts then hold ~8 pairs, and a second tile of one reads its weights
    # again); `python3 scripts/experiments/blockm_sweep.py`. The engine's static batch at context 1024
    # (`python3 scripts/experiments/moe_small_tiles_ab.py`): +6 / +4 / +3 % at 10 / 16 / 32 sequences; an entry up
    # to 48 tokens lost 2 % at 48, so up to 32 (BENCHMARKS.md run 45).
    "moe_wgmma_small": dict(BLOCK_M=8, BLOCK_N=64, BLOCK_K=64, STAGES=2, SUB=5, num_warps=4, MAX_PAIRS=4 * 32),
    "moe_wgmma": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, STAGES=2, SUB=5, num_warps=4, MAX_PAIRS=4 * 144),
    # and above, prompt chunks beside decodes: 64 pairs x 128 rows, single steps 4 deep: 385 / 575 / 969 us against
    # W_FIRST's 417 / 609 / 990 at 256 / 512 / 1024 tokens (the same sweep); the Triton prefill tiles keep longer
    # prompts
    "moe_wgmma_mid": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, STAGES=4, SUB=1, num_warps=4, MAX_PAIRS=4 * 1024),
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


# Programmatic dependent launch (PDL, sm90 and later): a kernel launched with it may be scheduled while the
# kernel before it in the stream is still finishing, so its launch latency and the other's last, partly empty
# wave overlap. Each such kernel must wait (griddepcontrol.wait) before it reads what the kernel before it
# writes: pdl_start waits, then lets the next kernel launch. So when a kernel starts, every kernel two back has
# finished; only buffers that the kernel right before cannot be writing (weights; for the MoE GEMV's mlp2, the
# router's expert ids) may be read before pdl_start, and the GEMVs do that with their first weights (their
# stream then starts while the kernel before finishes). The decode step runs 8-9 kernels a layer; CUDA graphs
# keep the launches programmatic. KUBRICK_PDL=0 (or false, no, off) turns it off (to measure it, or if a driver
# mishandles it).
@lru_cache(maxsize=None)
def _pdl_args(device_type: str, device_index: int | None) -> dict:
    if device_type != "cuda" or interpreting():
        return dict(PDL=False)
    index = device_index if device_index is not None else torch.cuda.current_device()
    on = not switched_off("KUBRICK_PDL") and torch.cuda.get_device_capability(index)[0] >= 9
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


def pdl(device: torch.device) -> dict:
    """Launch arguments for a kernel that calls pdl_start(PDL): PDL on where the GPU has it. Cached per
    device (it runs at every launch; callers spread it with **, so the cached dict is never changed)."""
    return _pdl_args(device.type, device.index)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Wait for the previous kernel's writes, then let the next kernel launch (see pdl above)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def round_to_bf16(x):
    """float32 -> the nearest bf16 (ties to even), still as float32. By hand because the 3.6 interpreter's
    .to(tl.bfloat16) truncates; compiled, this is what the conversion does."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE's precision, kept in float32 (bf16 by hand: the interpreter truncates)."""
    if DTYPE == tl.bfloat16:
        return round_to_bf16(x)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


# "The last program to arrive finishes the job": programs that each compute a part (a split of K, of the keys)
# count themselves in on an int32 counter, and the one that finds count - 1 arrivals before it combines the
# parts, which saves a second launch for the combine. The counters live in one zeroed buffer per device that
# every such kernel leaves zeroed (the last program resets its counter), so CUDA graphs replay them as is.
COUNTER_SLOTS = 1 << 16
_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """The device's zeroed int32 counters (created at the first call, before any CUDA-graph capture)."""
    if needed > COUNTER_SLOTS:
        raise ValueError(f"{needed} arrival counters wanted, only {COUNTER_SLOTS} exist")
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    key = (device.type, index)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


@triton.jit
def last_to_arrive(counter_ptr, programs: tl.constexpr):
    """Count this program in; True for the last of `programs` to arrive, which resets the counter to 0.

    The barrier orders every thread's stores of its part before the release of the one atomic add; the last
    program's acquire then sees all the parts, which it must load past L1 (cache_modifier=".cg"): L1 is not
    coherent, and may hold the same addresses from the last launch."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == programs - 1
    if last:
        tl.store(counter_ptr, 0)
    return last


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


# FAST_FP4 (block table entry, compiled GPUs only): decode MXFP4 with a few integer instructions per code in
# inline PTX (mxfp4_to_bf16) instead of Triton's float conversions. Its weights come out 2**-63 times too small,
# so that every E8M0 scale up to 2**64 fits a bf16 multiplier; the activations are multiplied by 2**63 instead.
X_SHIFT = tl.constexpr(2.0**63)


@triton.jit
def mxfp4_scale_bf16(scale):
    """E8M0 scales (uint8 s) -> bf16 2**(s - 127 - 63) * 2**126, the multiplier mxfp4_to_bf16 takes (s <= 191)."""
    bits = (tl.minimum(scale.to(tl.int32), 191) + 63) << 7
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


def _two_bytes_ptx(selector: str, first: str, second: str, scale: str) -> str:
    """PTX for two of the 4 bytes: t = [0, b1, 0, b0] (prmt), then per nibble the magnitude bits to bf16 bits 6..8
    and the sign to bit 15 of each half, and one bf16x2 fma with the multipliers (z = -0.0 pair as addend)."""
    code = f"prmt.b32 t, $4, zero, {selector};\n"
    for out, mag_shift, sign_shift in ((first, 6, 12), (second, 2, 8)):  # low nibbles, then high ones
        code += (f"shl.b32 m, t, {mag_shift};\nshl.b32 s, t, {sign_shift};\nand.b32 s, s, 0x80008000;\n"
                 f"lop3.b32 m, m, 0x01C001C0, s, 0xEA;\nfma.rn.bf16x2 {out}, m, {scale}, z;\n")
    return code


# Operands (Triton packs 4 elements a call): $0 $1 first codes of bytes 0-1 and 2-3, $2 $3 second codes,
# $4 the 4 bytes, $5 $6 their multipliers.
_MXFP4_PTX = tl.constexpr("{\n.reg .b32 t, m, s, z, zero;\nmov.b32 z, 0x80008000;\nmov.b32 zero, 0;\n"
              + _two_bytes_ptx("0x4140", "$0", "$2", "$5") + _two_bytes_ptx("0x4342", "$1", "$3", "$6") + "}")


@triton.jit
def mxfp4_to_bf16(packed, scale):
    """Bytes of two E2M1 codes (uint8, first code in the low nibble) and each byte's multiplier (bf16, from
    mxfp4_scale_bf16) -> (first codes, second codes) in bf16, each 2**-63 times its true value.

    The 3 magnitude bits of a code go to bf16 bits 6..8 and its sign to bit 15: an exact bf16 subnormal of
    value e2m1 * 2**-126 (as e2m1_over_16384 does with fp16); one bf16x2 fma with the multiplier then scales
    two codes at once. 22 instructions for 8 codes, no lookup table.
    """
    return tl.inline_asm_elementwise(
        asm=_MXFP4_PTX,
        constraints="=r,=r,=r,=r,r,r,r",
        args=[packed, scale],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


# The MoE kernels' (moe_gemv, moe_grouped, moe_wgmma) common start of their float32 sum over a token's experts.
def mlp2_sum(x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """The float32 [T, H] buffer mlp2 adds its experts' rows into: `out` itself (the float32 stream), else the
    residual or zeros. Starting from the residual saves a launch and a rounding."""
    tokens, hidden = x.shape
    if out is not None:
        assert residual is None and out.dtype == torch.float32 and out.shape == (tokens, hidden) and out.stride(-1) == 1
        return out
    if residual is None:
        return torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
    return residual.to(torch.float32, copy=True)
