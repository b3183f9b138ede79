"""MoE decode path: GEMVs over the selected experts for few tokens, MXFP4 weights dequantised in registers.

Two kernels per MoE block:
  mlp1: one program per (token, expert slot) x BLOCK_I output pairs; it reads the 2*BLOCK_I adjacent rows
        (gate 2i, linear 2i+1) of the packed weights, adds the bias and applies swiglu.
  mlp2: one program per (token, expert slot) x BLOCK_N output rows x split of K: it adds router_weight *
        (W2 h + b2) into a float32 sum with atomic adds. Slots and splits in the grid (rather than a loop over
        the slots) give enough programs to keep loads in flight on every SM at batch 1.
Weights stay packed; each step covers BLOCK_K values (BLOCK_K/32 scale groups) of every row, and each word's
8-value partial sum is multiplied by its group's scale (the scale factors out of the group's dot).

At batch 1 these kernels are held back by issue and latency together (Nsight Compute on the H100: about 45 %
of DRAM bandwidth and 48 % of SM throughput, BENCHMARKS.md run 32): every 4-bit code must become a float, so
each instruction per code counts (SASS of the loop, sm90: 8.8 per code before this layout, 4.9 after):
  - Decoding ("SWAR", SIMD within a register): four packed bytes are read as one 32-bit word and turned into
    four words of two bf16 bit patterns each with 11 shift/mask ops; a bf16 pattern becomes a float32 by one
    shift or mask. The patterns put the 3 magnitude bits at the bottom of the bf16 exponent, so code 1 (0.5)
    is a float32 subnormal: every value is true * 2**-126, undone by x carrying 2**64 and the group sums
    2**62 (no overflow or underflow on the way).
  - The activations come in "GEMV layout" (`GemvInput`, made by `gemv_input`, or written by rmsnorm /
    norm_router through `new_gemv_input`): float32, times 2**64, transposed so that x_t[j, w] = x[8w + j]. Code
    j of word w meets x_t[j, w], and 4 consecutive words need one 16-byte load per j, where bf16 x cost a 2-byte
    load, a conversion and a multiply per value. mlp1 writes h in the same layout for mlp2.
  - The half layout (HALF, sm90's table, bf16 / fp16 models): fp16 pairs (x[8w + j], x[8w + j + 4]) in one
    32-bit word, x times a power of two per token (its largest |x| lands in [2**13, 2**14]; h, bounded by
    swiglu's clamp, gets a fixed one). A code pair becomes an f16x2 of code * 2**-14 and one f16x2 fma does two
    products, so a word of 8 codes takes 11 decode instructions, 4 fmas, one activation load and 2 conversions
    (`word_dot_f16`, inline PTX): 3.2 instructions a code in mlp1's loop against 4.9 (`sass_per_code.py
    --half`), 30.0 against 36.4 us a layer at 1 token on the H100. bf16 activations fit fp16 exactly and every
    product is exact; the 8-product sums round to fp16 (11 bits), 2e-3 apart from the float32 layout in the
    bf16 outputs (about their own rounding).
  - Tiles are [BLOCK_K/32 groups, rows, 4 words]. On sm90 Triton 3.6 gives a thread the 4 words of one group of
    one row (one 16-byte load; a warp spans 16 groups of 2 rows), so each 16-byte x load serves the 2 rows of a
    warp. Products are scaled per word and summed over words and groups only after the K loop (4.88
    instructions a code against 4.97 when summed every step; the same time on the H100).
  - The K loop runs unmasked over whole steps, and one masked step takes the rest.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import block_config, mlp2_sum, num_sms, pdl, pdl_start, switched_off

X_SCALE: tl.constexpr = tl.constexpr(2.0**64)  # the activations' factor in GEMV layout (see the docstring)


@triton.jit
def store_gemv_layout(row_ptr, cols, values, K, mask):
    """Columns `cols` of one row of K activations (float32) into that row's GEMV layout: times 2**64, at
    [col % 8, col // 8]. What rmsnorm, norm_router and mlp1 write for the GEMVs that read them."""
    tl.store(row_ptr + (cols % 8) * (K // 8) + cols // 8, values * X_SCALE, mask=mask)


# Half-precision GEMV layout (GPUs only, for bf16/fp16 models): the activations as fp16 pairs, each 32-bit word
# (x[8w + j], x[8w + j + 4]) for j = 0..3, so that one f16x2 fma multiplies two codes of a packed word at once.
# x is scaled by a power of two per token (max |x| * 2**e in [2**13, 2**14)), which keeps products and sums of
# eight in fp16's range; bf16 activations fit fp16's 11 bits exactly, and the code products are exact too.
@triton.jit
def store_half_layout(row_ptr, cols, values, K, mask):
    """Columns `cols` of one row (float32, already times its power of two) as fp16 into the half layout: pair
    word j of word w is (x[8w + j], x[8w + j + 4]), at [j, w]. row_ptr points at fp16."""
    j = cols % 8
    tl.store(row_ptr + ((j % 4) * (K // 8) + cols // 8) * 2 + j // 4, values.to(tl.float16), mask=mask)


@triton.jit
def half_exponent(max_abs):
    """The power of two e that puts a row whose largest magnitude is max_abs into [2**13, 2**14)."""
    floor_log2 = ((max_abs.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.where(max_abs > 0, 13 - floor_log2, 0)
    return tl.minimum(tl.maximum(e, -60), 60)


@triton.jit
def _pow2(e):
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def store_gemv_input(data_ptr, mult_ptr, row, cols, values, K, mask, row_max, write_mult, HALF: tl.constexpr):
    """Columns `cols` of row `row` (float32 values, as the model rounds them) into a GemvInput's data, K values a
    row; HALF: scaled by the power of two that row_max (the row's largest magnitude) asks for, and the row's
    multiplier written where write_mult is true (one program of the row is enough)."""
    if HALF:
        e = half_exponent(row_max)
        store_half_layout(data_ptr.to(tl.pointer_type(tl.float16)) + row * K, cols, values * _pow2(e), K, mask)
        tl.store(mult_ptr + row, _pow2(14 - e), mask=write_mult)
    else:
        store_gemv_layout(data_ptr + row * K, cols, values, K, mask)


# One packed word (8 codes) against its four fp16 activation pairs -> the float32 sum of the 8 products. A code
# becomes the high byte of an fp16 (sign to bit 7, magnitude to bits 1-3: code * 2**-14, a subnormal for 0.5):
# u holds the even codes 0 2 4 6 so made, one a byte, v the odd ones; a byte permute (prmt) or a mask then puts
# the pair (j, j + 4) in the two halves of one f16x2 (11 instructions for 8 codes). One f16x2 multiply and three
# fmas sum the eight products, and the two halves are added in float32.
_WORD_DOT_PTX = tl.constexpr(
    "{\n.reg .b32 u, v, t, a, b, c, d, z;\n.reg .b16 lo, hi;\n.reg .f32 flo, fhi;\nmov.b32 z, 0;\n"
    "shl.b32 t, $1, 1;\nand.b32 u, t, 0x0E0E0E0E;\nshl.b32 t, $1, 4;\nlop3.b32 u, t, 0x80808080, u, 0xEA;\n"
    "shr.b32 t, $1, 3;\nand.b32 v, t, 0x0E0E0E0E;\nlop3.b32 v, $1, 0x80808080, v, 0xEA;\n"
    "prmt.b32 a, u, z, 0x2404;\nand.b32 c, u, 0xFF00FF00;\nprmt.b32 b, v, z, 0x2404;\nand.b32 d, v, 0xFF00FF00;\n"
    "mul.rn.f16x2 a, a, $2;\nfma.rn.f16x2 a, b, $3, a;\nfma.rn.f16x2 a, c, $4, a;\nfma.rn.f16x2 a, d, $5, a;\n"
    "mov.b32 {lo, hi}, a;\ncvt.f32.f16 flo, lo;\ncvt.f32.f16 fhi, hi;\nadd.f32 $0, flo, fhi;\n}"
)


@triton.jit
def word_dot_f16(w, x0, x1, x2, x3):
    """sum over the 8 codes of packed word w (uint32) of code * 2**-14 * x, x in fp16 pairs x0..x3 (uint32)."""
    return tl.inline_asm_elementwise(asm=_WORD_DOT_PTX, constraints="=f,r,r,r,r,r", args=[w, x0, x1, x2, x3],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _e8m0(scale):
    return (scale << 23).to(tl.float32, bitcast=True)


@triton.jit
def _lo(pair):
    """The low bf16 pattern of a 32-bit word as a float32 (a bf16 is the top half of a float32)."""
    return (pair << 16).to(tl.float32, bitcast=True)


@triton.jit
def _hi(pair):
    return (pair & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _x(xt, j: tl.constexpr, word, K_WORDS: tl.constexpr, in_k, MASK_K: tl.constexpr):
    """x[8 * word + j] (times 2**64) from the GEMV layout: contiguous over consecutive words."""
    if MASK_K:
        return tl.load(xt + j * K_WORDS + word, mask=in_k, other=0.0)
    return tl.load(xt + j * K_WORDS + word)


@triton.jit
def _load_step(w_words, w_scales, rows, row_mask, w0, w_limit, K_WORDS: tl.constexpr, NSB: tl.constexpr,
               MASK_ROWS: tl.constexpr, MASK_K: tl.constexpr):
    """The packed words [NSB, R, 4] (uint32) and their scales [NSB, R, 4] of words w0 .. w0 + 4*NSB of `rows`.

    MASK_K: words at or past w_limit read as 0 (and are not read: the last row's tail lies past the tensor)."""
    sb = tl.arange(0, NSB)
    q = tl.arange(0, 4)
    word = w0 + sb[:, None, None] * 4 + q[None, None, :]  # [NSB, 1, 4]
    mask = row_mask[None, :, None]
    if MASK_K:
        mask = (mask & (word < w_limit)) if MASK_ROWS else word < w_limit
    MASKED: tl.constexpr = MASK_ROWS or MASK_K
    w = tl.load(w_words + rows[None, :, None] * K_WORDS + word, mask=mask if MASKED else None,
                other=0 if MASKED else None)
    # Each word's scale, in the words' own layout: a thread holds a group's 4 words, so this is one byte load.
    scale = tl.load(w_scales + rows[None, :, None] * (K_WORDS // 4) + word // 4, mask=mask if MASKED else None,
                    other=0 if MASKED else None)
    return w.to(tl.uint32, bitcast=True), scale


@triton.jit
def _dot_words(w, scale, xt, w0, K_WORDS: tl.constexpr, NSB: tl.constexpr, MASK_K: tl.constexpr,
               HALF: tl.constexpr):
    """sum_k W[rows, k] x[k] per word for the words _load_step read at w0 -> [NSB, R, 4] float32.

    xt points at the token's activations in GEMV layout ([8, K_WORDS] float32, times 2**64), or with HALF in
    the half layout ([4, K_WORDS] int32 pair words; the sums then come out times 2**-14 and x's power of two).
    """
    word = w0 + tl.arange(0, NSB)[:, None, None] * 4 + tl.arange(0, 4)[None, None, :]  # [NSB, 1, 4]
    in_k = word < K_WORDS
    if HALF:
        part = word_dot_f16(w, _x(xt, 0, word, K_WORDS, in_k, MASK_K), _x(xt, 1, word, K_WORDS, in_k, MASK_K),
                            _x(xt, 2, word, K_WORDS, in_k, MASK_K), _x(xt, 3, word, K_WORDS, in_k, MASK_K))
        return part * _e8m0(scale.to(tl.int32))
    a = ((w & 0x00080008) << 12) | ((w & 0x00070007) << 6)  # codes 0 and 4 of the word
    b = ((w & 0x00800080) << 8) | ((w & 0x00700070) << 2)  # codes 1 and 5
    c = ((w & 0x08000800) << 4) | ((w & 0x07000700) >> 2)  # codes 2 and 6
    d = (w & 0x80008000) | ((w & 0x70007000) >> 6)  # codes 3 and 7
    # Word pair (lo, hi) of a holds codes (0, 4) of the word, b (1, 5), c (2, 6), d (3, 7).
    # One multiply-add chain (no separate adds): part accumulates the word's 8 products.
    part = _lo(a) * _x(xt, 0, word, K_WORDS, in_k, MASK_K)
    part += _lo(b) * _x(xt, 1, word, K_WORDS, in_k, MASK_K)
    part += _lo(c) * _x(xt, 2, word, K_WORDS, in_k, MASK_K)
    part += _lo(d) * _x(xt, 3, word, K_WORDS, in_k, MASK_K)
    part += _hi(a) * _x(xt, 4, word, K_WORDS, in_k, MASK_K)
    part += _hi(b) * _x(xt, 5, word, K_WORDS, in_k, MASK_K)
    part += _hi(c) * _x(xt, 6, word, K_WORDS, in_k, MASK_K)
    part += _hi(d) * _x(xt, 7, word, K_WORDS, in_k, MASK_K)
    # Scaled per word; the sums over words and groups wait until after the K loop (a few instructions fewer).
    return part * (4.611686018427388e18 * _e8m0(scale.to(tl.int32)))  # 2**62: see the docstring


@triton.jit
def _dot_row_block(w_words, w_scales, rows, row_mask, xt, w_start, w_end, K_WORDS: tl.constexpr, NSB: tl.constexpr,
                   MASK_ROWS: tl.constexpr, HALF: tl.constexpr, WAIT_AFTER_FIRST: tl.constexpr = False):
    """sum over words w_start .. w_end (w_start a multiple of the step) -> [R] float32.

    WAIT_AFTER_FIRST: the kernel has not waited for the one before (pdl_start) yet: the first step's weights
    are loaded, then it waits, then x is read.
    Neither loading each step's weights a step ahead into registers nor Triton's pipelining through shared
    memory (tl.range(num_stages=)) made this faster on the H100 (BENCHMARKS.md, run 32)."""
    STEP: tl.constexpr = 4 * NSB
    acc = tl.zeros((NSB, rows.shape[0], 4), dtype=tl.float32)
    first = w_start
    if WAIT_AFTER_FIRST:  # masked at w_end: a split may be shorter than a step
        w, scale = _load_step(w_words, w_scales, rows, row_mask, w_start, w_end, K_WORDS, NSB, MASK_ROWS, True)
        pdl_start(True)
        acc += _dot_words(w, scale, xt, w_start, K_WORDS, NSB, True, HALF)
        first = w_start + STEP
    # (a split past the end of K, w_end < first, adds nothing: the max keeps that plain)
    full_end = first + tl.maximum(w_end - first, 0) // STEP * STEP
    for w0 in range(first, full_end, STEP):
        w, scale = _load_step(w_words, w_scales, rows, row_mask, w0, w_end, K_WORDS, NSB, MASK_ROWS, False)
        acc += _dot_words(w, scale, xt, w0, K_WORDS, NSB, False, HALF)
    if full_end < w_end:
        w, scale = _load_step(w_words, w_scales, rows, row_mask, full_end, w_end, K_WORDS, NSB, MASK_ROWS, True)
        acc += _dot_words(w, scale, xt, full_end, K_WORDS, NSB, True, HALF)
    return tl.sum(tl.sum(acc, axis=2), axis=0)


@triton.jit
def _gemv_input_kernel(x_ptr, stride_x, data_ptr, mult_ptr, K: tl.constexpr, BLOCK: tl.constexpr,
                       HALF: tl.constexpr, PDL: tl.constexpr):
    """One program per token: x [K] (any float dtype) -> its GemvInput row."""
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + token * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    store_gemv_input(data_ptr, mult_ptr, token, cols, x, K, cols < K, tl.max(tl.abs(x), axis=0), True, HALF)


class GemvInput(NamedTuple):
    """Activations in the layout the GEMV reads: float32 [T, 8, K/8] times 2**64 (`mult` None), or the half
    layout, int32 pair words [T, 4, K/8] with each token's multiplier 2**(14 - e) in `mult` [T] float32."""

    data: torch.Tensor
    mult: torch.Tensor | None

    @property
    def half(self) -> bool:
        return self.mult is not None


def uses_half(dtype: torch.dtype, device: torch.device, config: dict | None = None) -> bool:
    """Whether moe_gemv takes the half layout: on GPUs whose table says so (inline PTX), for bf16 / fp16 x, unless
    KUBRICK_GEMV_HALF is 0 / false / no / off (to measure it, or to rule its fp16 sums out)."""
    if switched_off("KUBRICK_GEMV_HALF") or dtype not in (torch.bfloat16, torch.float16):
        return False
    return bool((block_config("moe_gemv", device) | (config or {})).get("HALF", False))


def new_gemv_input(tokens: int, k: int, dtype: torch.dtype, device: torch.device,
                   config: dict | None = None) -> GemvInput:
    """An empty GemvInput for `tokens` rows of k activations of `dtype`, for rmsnorm / norm_router to fill."""
    if uses_half(dtype, device, config):
        return GemvInput(torch.empty(tokens, 4, k // 8, dtype=torch.int32, device=device),
                         torch.empty(tokens, dtype=torch.float32, device=device))
    return GemvInput(torch.empty(tokens, 8, k // 8, dtype=torch.float32, device=device), None)


def gemv_input(x: torch.Tensor, config: dict | None = None) -> GemvInput:
    """x [T, K] in the GEMV's layout (the one uses_half picks)."""
    tokens, k = x.shape
    out = new_gemv_input(tokens, k, x.dtype, x.device, config)
    _gemv_input_kernel[(tokens,)](x, x.stride(0), out.data, out.mult if out.half else out.data, K=k,
                                  BLOCK=triton.next_power_of_2(k), HALF=out.half, **pdl(x.device), num_warps=4)
    return out


@triton.jit
def _mlp1_swiglu_gemv_kernel(
    xt_ptr, x_mult_ptr, ids_ptr, w_blocks, w_scales, bias_ptr, ht_ptr,
    INTER: tl.constexpr, HIDDEN: tl.constexpr, TOPK: tl.constexpr, alpha, limit,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, H_DTYPE: tl.constexpr, HALF: tl.constexpr, H_EXP: tl.constexpr,
    PDL: tl.constexpr,
):
    """h = swiglu(W1 x + b1) for one (token, slot) pair, rounded to H_DTYPE and written in GEMV layout (HALF:
    x and h in the half layout, x with its multiplier at x_mult_ptr, h times 2**H_EXP)."""
    pdl_start(PDL)
    pair = tl.program_id(0).to(tl.int64)  # token * TOPK + slot
    token = pair // TOPK
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    local = tl.program_id(1) * (2 * BLOCK_I) + tl.arange(0, 2 * BLOCK_I)  # gate and linear rows, interleaved
    MASK_ROWS: tl.constexpr = INTER % BLOCK_I != 0
    row_mask = local < 2 * INTER
    rows = expert * (2 * INTER) + local
    K_WORDS: tl.constexpr = HIDDEN // 8
    X_ROW: tl.constexpr = HIDDEN // 2 if HALF else HIDDEN  # an int32 pair word holds two fp16
    y = _dot_row_block(w_blocks, w_scales, rows, row_mask, xt_ptr + token * X_ROW, 0, K_WORDS, K_WORDS,
                       BLOCK_K // 32, MASK_ROWS, HALF)
    if HALF:
        y *= tl.load(x_mult_ptr + token)
    y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    gate, lin = tl.split(tl.reshape(y, (BLOCK_I, 2)))
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    out = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    # h as the reference rounds it, in GEMV layout
    if HALF:
        store_half_layout(ht_ptr.to(tl.pointer_type(tl.float16)) + pair * INTER, i,
                          out.to(H_DTYPE).to(tl.float32) * (2.0**H_EXP), INTER, i < INTER)
    else:
        store_gemv_layout(ht_ptr + pair * INTER, i, out.to(H_DTYPE).to(tl.float32), INTER, i < INTER)


@triton.jit
def _mlp2_combine_gemv_kernel(
    ht_ptr, ids_ptr, route_w_ptr, w_blocks, w_scales, bias_ptr, out_ptr,
    HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr, HALF: tl.constexpr,
    H_EXP: tl.constexpr, PDL: tl.constexpr,
):
    """out[token] += router_weight * (W2 h + b2) for one (token, slot) pair, one block of rows, one split of K.

    out is float32 and filled by the caller (zeros, or the residual); every (slot, split) adds atomically.
    """
    # The expert ids come from the router, which finished before mlp1 let this kernel launch: under PDL the
    # first step's weights are loaded before waiting for mlp1's h (the stream of W starts during mlp1's tail).
    pair = tl.program_id(0).to(tl.int64)
    token = pair // TOPK
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    MASK_ROWS: tl.constexpr = HIDDEN % BLOCK_N != 0
    mask_n = offs_n < HIDDEN
    split = tl.program_id(2)
    K_WORDS: tl.constexpr = INTER // 8
    w_start = split * (K_PER_SPLIT // 8)
    w_end = tl.minimum(w_start + K_PER_SPLIT // 8, K_WORDS)
    expert = tl.load(ids_ptr + pair, cache_modifier=".cg").to(tl.int64)  # past L1: read before the wait
    rows = expert * HIDDEN + offs_n
    H_ROW: tl.constexpr = INTER // 2 if HALF else INTER
    y = _dot_row_block(w_blocks, w_scales, rows, mask_n, ht_ptr + pair * H_ROW, w_start, w_end, K_WORDS,
                       BLOCK_K // 32, MASK_ROWS, HALF, PDL)
    if HALF:
        y *= 2.0 ** (14 - H_EXP)
    if split == 0:
        y += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
    y *= tl.load(route_w_ptr + pair).to(tl.float32)
    tl.atomic_add(out_ptr + token * HIDDEN + offs_n, y, mask=mask_n, sem="relaxed")


def h_exponent(swiglu_limit: float) -> int:
    """The fixed power of two of h in fp16 (the half layout): swiglu's clamp bounds |h| by limit * (limit + 1),
    which then lands under 2**14."""
    return 13 - math.floor(math.log2(max(swiglu_limit * (swiglu_limit + 1), 1.0)))


def pick_split_k(pairs: int, hidden: int, inter: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Split K of mlp2 until there are about four programs per SM (never below one K step per split)."""
    programs = pairs * triton.cdiv(hidden, block_n)
    split = 1
    while programs * split < 4 * num_sms(device) and inter // (split * 2) >= block_k:
        split *= 2
    return split


def moe_gemv(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    mlp1_blocks: torch.Tensor,
    mlp1_scales: torch.Tensor,
    mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor,
    mlp2_scales: torch.Tensor,
    mlp2_bias: torch.Tensor,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    split_k: int | None = None,
    config: dict | None = None,
    x_gemv: GemvInput | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE block for a few tokens: x [T, H] -> [T, H] in x's dtype (see kernels.reference.moe).

    `config` overrides entries of the block table (BLOCK_I, BLOCK_N, BLOCK_K, num_warps, and MLP2: a dict of
    BLOCK_N / BLOCK_K / num_warps that mlp2 takes over the others; HALF). `x_gemv`: x already in the GEMV's
    layout (a GemvInput from `gemv_input(x)`, or written by rmsnorm / norm_router), which saves a launch. `residual`
    [T, H]: return residual + moe(x) instead, the sum mlp2 adds into starting from it (one launch less than
    adding it after). `out`: a float32 [T, H] buffer holding the residual (the float32 stream): the block is
    summed into it in place and it is returned as it is (no launch to copy the residual in, none to cast).
    """
    tokens, hidden = x.shape
    topk = expert_ids.shape[1]
    inter = mlp1_blocks.shape[1] // 2
    for t in (mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales, expert_ids, expert_weights):
        assert t.is_contiguous()
    assert x.stride(-1) == 1 and hidden % 32 == 0 and inter % 32 == 0
    cfg = block_config("moe_gemv", x.device) | (config or {})  # (MAX_PAIRS is moe()'s, not ours)
    if x_gemv is None:
        x_gemv = gemv_input(x, config)
    # In the half layout h is bounded by swiglu's clamp, |h| <= limit * (limit + 1), so a fixed power of two fits it.
    half = x_gemv.half
    assert not half or math.isfinite(swiglu_limit), "the half layout needs swiglu's clamp"
    h_exp = h_exponent(swiglu_limit) if half else 0
    h_shape = (tokens * topk, 4, inter // 8) if half else (tokens * topk, 8, inter // 8)
    h_gemv = torch.empty(h_shape, dtype=torch.int32 if half else torch.float32, device=x.device)
    # Four packed bytes are read as one int32 word.
    w1, w2 = mlp1_blocks.view(torch.int32), mlp2_blocks.view(torch.int32)
    # Pairs first: at 8 tokens pairs that share an expert run together and meet in L2 (rows first: 18 % slower).
    grid1 = (tokens * topk, triton.cdiv(inter, cfg["BLOCK_I"]))
    _mlp1_swiglu_gemv_kernel[grid1](
        x_gemv.data, x_gemv.mult if half else x_gemv.data, expert_ids, w1, mlp1_scales, mlp1_bias, h_gemv,
        INTER=inter, HIDDEN=hidden, TOPK=topk, alpha=swiglu_alpha, limit=swiglu_limit,
        BLOCK_I=cfg["BLOCK_I"], BLOCK_K=cfg["BLOCK_K"], H_DTYPE=_TL_DTYPE[x.dtype], HALF=half, H_EXP=h_exp,
        **pdl(x.device), num_warps=cfg["num_warps"],
    )
    cfg2 = cfg | cfg.get("MLP2", {})  # mlp2 (K = intermediate, N = hidden) may run on its own blocks
    block_k = cfg2["BLOCK_K"]
    if split_k is None:
        split_k = pick_split_k(tokens * topk, hidden, inter, cfg2["BLOCK_N"], block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(inter, split_k), block_k) * block_k
    # Every (slot, split) program adds into a float32 sum, which starts as the residual if there is one (then
    # the MoE output is not rounded to x's dtype before the residual is added: a difference within bf16).
    stream = out is not None
    assert not stream or out.is_contiguous()  # (rows are addressed as token * hidden)
    out = mlp2_sum(x, residual, out)
    grid2 = (tokens * topk, triton.cdiv(hidden, cfg2["BLOCK_N"]), split_k)
    _mlp2_combine_gemv_kernel[grid2](
        h_gemv, expert_ids, expert_weights, w2, mlp2_scales, mlp2_bias, out,
        HIDDEN=hidden, INTER=inter, TOPK=topk, BLOCK_N=cfg2["BLOCK_N"], BLOCK_K=block_k, K_PER_SPLIT=k_per_split,
        HALF=half, H_EXP=h_exp, **pdl(x.device), num_warps=cfg2["num_warps"],
    )
    return out if stream or out.dtype == x.dtype else out.to(x.dtype)


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
