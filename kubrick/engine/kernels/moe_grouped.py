"""MoE prefill path: token/expert pairs grouped by expert, tiled tl.dot on MXFP4 weights dequantised in registers.

group_by_expert() sorts the T*k (token, slot) pairs by expert on the GPU in one small kernel (no host sync, so
it can live in a CUDA graph) and pads each expert's run to a multiple of BLOCK_M; every tile of BLOCK_M pairs
then belongs to one expert. Tiles past the end get expert -1 and exit at once (the grid is sized for the worst case).
  mlp1: tile of BLOCK_M pairs x BLOCK_N output pairs; gate (row 2i) and linear (row 2i+1) accumulate in two
        dots; bias + swiglu fused; h [T*k, I] in x's dtype.
  mlp2: tile of BLOCK_M pairs x BLOCK_N rows; bias and router weight fused; float32 atomic add into out [T, H]
        (a token's k experts live in different tiles).
Packed bytes hold K positions (2j, 2j+1) in (low, high) nibble, so each K step runs two dots: activations at
even K positions against the low nibbles, odd against the high ones; no interleave shuffle is needed.

DOT_SCALED (config entry; sm90's table used it until W_FIRST beat it): instead of dequantising, hand the
packed bytes [K/2, N] and the E8M0 scales [N, K/32] to tl.dot_scaled(x, None, "bf16", w, scales, "e2m1") as
they are stored; gpt-oss's MXFP4 is the OCP MX format that dot_scaled takes (first code in the low nibble).
The Triton 3.6 CPU interpreter has no dot_scaled, so CPU tests run the tl.dot path and GPU tests both.

W_FIRST (sm90's table above the small steps): our dequantised weights as the dot's first operand, W @ x^T summed
transposed, so that on sm90 they are wgmma's register operand (see _expert_matmul); mlp1 then runs ONE_DOT.

F16 (config entry, opt-in: 2-7 % behind sm90's small table, BENCHMARKS.md run 34): fp16 codes with no scale and fp16
activations (f16_input), W @ x^T on mma.sync, each scale group's float32 sums scaled as they are added; its own
two kernels (_mlp1_swiglu_f16_kernel, _mlp2_combine_f16_kernel; see _f16_matmul).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import (
    X_SHIFT,
    block_config,
    e2m1_over_16384,
    e8m0_times_16384,
    interpreting,
    mxfp4_codes_f16,
    mxfp4_scale_bf16,
    mxfp4_to_bf16,
    pdl,
    pdl_start,
)
from kubrick.engine.kernels.moe_gemv import _TL_DTYPE, h_exponent, half_exponent, uses_half


# Up to this many (token, expert) pairs, experts see few tokens each: short tiles waste less work (the
# moe_grouped_small table's MAX_PAIRS, where a GPU family measured its own crossover, overrides it).
SMALL_PAIRS = 512


# PAIRS and TILES change with every step's token count: unspecialised, one compiled kernel serves them all
# (Triton would otherwise compile a variant for counts divisible by 16 and for 1, ~0.5 s each, mid-serving).
@triton.jit(do_not_specialize=["PAIRS", "TILES"])
def _group_by_expert_kernel(ids_ptr, pair_ids_ptr, tile_expert_ptr, PAIRS, TILES, N_EXPERTS: tl.constexpr,
                            BLOCK_M: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """One program: count pairs per expert, lay each expert's run out in whole tiles (a stable sort), and name
    each tile's expert. Replaces ~12 torch launches (scatter_add, argsort, cumsum, searchsorted …) a layer."""
    pdl_start(PDL)
    experts = tl.arange(0, E)
    rows = tl.arange(0, CHUNK)
    counts = tl.zeros((E,), dtype=tl.int32)
    for p0 in range(0, PAIRS, CHUNK):
        ids = tl.load(ids_ptr + p0 + rows, mask=p0 + rows < PAIRS, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tiles_per_expert = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles_per_expert, axis=0)
    tile_start = tile_end - tiles_per_expert
    # Tile t belongs to the first expert whose tiles end after t; past the last one, to none (-1).
    for t0 in range(0, TILES, CHUNK):
        t = t0 + rows
        owner = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32), axis=1)
        tl.store(tile_expert_ptr + t, tl.where(owner < N_EXPERTS, owner, -1), mask=t < TILES)
    for s0 in range(0, TILES * BLOCK_M, CHUNK):  # padding first; the pairs overwrite their own slots below
        tl.store(pair_ids_ptr + s0 + rows, tl.full((CHUNK,), -1, tl.int32), mask=s0 + rows < TILES * BLOCK_M)
    tl.debug_barrier()
    seen = tl.zeros((E,), dtype=tl.int32)  # pairs of each expert placed so far, in pair order (stable)
    for p0 in range(0, PAIRS, CHUNK):
        ids = tl.load(ids_ptr + p0 + rows, mask=p0 + rows < PAIRS, other=-1)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E] one-hot
        before = tl.cumsum(hit, axis=0) - hit + seen[None, :]  # same-expert pairs ahead of each one
        slot = tl.sum(hit * (tile_start[None, :] * BLOCK_M + before), axis=1)
        tl.store(pair_ids_ptr + slot, p0 + rows, mask=p0 + rows < PAIRS)
        seen += tl.sum(hit, axis=0)


def group_by_expert(expert_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> (pair ids int32 [tiles*block_m], -1 = padding; tile expert int32 [tiles], -1 = none).

    Pairs are numbered token * k + slot; each expert's pairs appear in that order (reference.group_by_expert).
    """
    flat = expert_ids.reshape(-1).to(torch.int32).contiguous()
    pairs = flat.numel()
    tiles = triton.cdiv(pairs, block_m) + n_experts  # worst case: every expert's run ends in a partial tile
    pair_ids = torch.empty(tiles * block_m, dtype=torch.int32, device=flat.device)
    tile_expert = torch.empty(tiles, dtype=torch.int32, device=flat.device)
    width = triton.next_power_of_2(n_experts)
    _group_by_expert_kernel[(1,)](
        flat, pair_ids, tile_expert, pairs, tiles, N_EXPERTS=n_experts, BLOCK_M=block_m, E=width,
        CHUNK=max(16, 4096 // width), **pdl(flat.device), num_warps=4,
    )
    return pair_ids, tile_expert


@triton.jit
def _dequant_tile(w_blocks, w_scales, rows, row_mask, b, K_BYTES: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  FAST_FP4: tl.constexpr = False, b0=0):
    """Weights of `rows` at byte columns b, transposed for tl.dot: (low nibbles, high nibbles), each [len(b), len(rows)].
    FAST_FP4: bf16 from inline PTX, 2**-63 times the true weights (_common.mxfp4_to_bf16)."""
    mask = (b[:, None] < K_BYTES) & row_mask[None, :]
    if FAST_FP4:
        BYTES: tl.constexpr = b.shape[0]
        ROWS: tl.constexpr = rows.shape[0]
        packed = tl.load(w_blocks + rows[None, :] * K_BYTES + b[:, None], mask=mask, other=0)
        groups = b0 // 16 + tl.arange(0, BYTES // 16)  # b = b0 + arange: whole 16-byte scale groups
        scale = tl.load(w_scales + rows[None, :] * (K_BYTES // 16) + groups[:, None],
                        mask=(groups[:, None] < K_BYTES // 16) & row_mask[None, :], other=0)
        scale = tl.broadcast_to(mxfp4_scale_bf16(scale)[:, None, :], (BYTES // 16, 16, ROWS))
        return mxfp4_to_bf16(packed, tl.reshape(scale, (BYTES, ROWS)))
    packed = tl.load(w_blocks + rows[None, :] * K_BYTES + b[:, None], mask=mask, other=0).to(tl.int32)
    scale = tl.load(w_scales + rows[None, :] * (K_BYTES // 16) + b[:, None] // 16, mask=mask, other=0).to(tl.int32)
    scale = e8m0_times_16384(scale)
    low = (e2m1_over_16384(packed & 15) * scale).to(DOT_DTYPE)
    high = (e2m1_over_16384(packed >> 4) * scale).to(DOT_DTYPE)
    return low, high


@triton.jit
def _even_odd(x_ptr, rows, stride, valid, b, K_BYTES: tl.constexpr, DOT_DTYPE: tl.constexpr, FAST_FP4: tl.constexpr = False):
    """Activations of `rows` at K positions 2b and 2b+1, each [len(rows), len(b)] (the tl.dot path); FAST_FP4:
    times 2**63 (exact), to meet weights 2**-63 too small."""
    if FAST_FP4:  # one contiguous load (vectorised, pipelined), split in registers
        k = 2 * b[None, :, None] + tl.arange(0, 2)[None, None, :]
        x = tl.load(x_ptr + rows[:, None, None] * stride + k, mask=valid[:, None, None] & (k < 2 * K_BYTES), other=0.0)
        even, odd = tl.split((x.to(tl.float32) * X_SHIFT).to(DOT_DTYPE))
        return even, odd
    mask = valid[:, None] & (b[None, :] < K_BYTES)
    at = x_ptr + rows[:, None] * stride + 2 * b[None, :]
    return tl.load(at, mask=mask, other=0.0).to(DOT_DTYPE), tl.load(at + 1, mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _dot_dequant(even, odd, w_blocks, w_scales, w_rows, w_mask, b, K_BYTES: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, acc, FAST_FP4: tl.constexpr = False, b0=0):
    """acc + activations @ W[w_rows]^T over byte columns b (= b0 + arange): even K positions against the low
    nibbles, odd against the high ones."""
    low, high = _dequant_tile(w_blocks, w_scales, w_rows, w_mask, b, K_BYTES, DOT_DTYPE, FAST_FP4, b0)
    acc = tl.dot(even, low, acc, input_precision=DOT_PRECISION)
    return tl.dot(odd, high, acc, input_precision=DOT_PRECISION)


@triton.jit
def _x_tile(x_ptr, rows, stride, valid, b0, K_BYTES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Activations [len(rows), BLOCK_K] at K positions 2*b0 … (DOT_SCALED: in their natural order)."""
    k = 2 * b0 + tl.arange(0, BLOCK_K)
    return tl.load(x_ptr + rows[:, None] * stride + k[None, :], mask=valid[:, None] & (k[None, :] < 2 * K_BYTES),
                   other=0.0).to(tl.bfloat16)


@triton.jit
def _dot_mxfp4(x, w_blocks, w_scales, rows, row_mask, b, b0, K_BYTES: tl.constexpr, BLOCK_K: tl.constexpr, acc):
    """acc + x @ W[rows]^T over BLOCK_K positions with tl.dot_scaled: the packed bytes [K/2, N] and E8M0 scales
    [N, K/32] go in as they are stored (two codes a byte, the first in the low nibble, as MX specifies)."""
    mask = (b[:, None] < K_BYTES) & row_mask[None, :]
    packed = tl.load(w_blocks + rows[None, :] * K_BYTES + b[:, None], mask=mask, other=0)
    groups = b0 // 16 + tl.arange(0, BLOCK_K // 32)
    scales = tl.load(w_scales + rows[:, None] * (K_BYTES // 16) + groups[None, :],
                     mask=row_mask[:, None] & (groups[None, :] < K_BYTES // 16), other=0)
    return tl.dot_scaled(x, None, tl.constexpr("bf16"), packed, scales, tl.constexpr("e2m1"), acc)


@triton.jit
def _w_rows(w_blocks, w_scales, rows, row_mask, b0, K_BYTES: tl.constexpr, BLOCK_K: tl.constexpr,
            DOT_DTYPE: tl.constexpr, FAST_FP4: tl.constexpr):
    """W[rows] at K positions 2*b0 … 2*b0 + BLOCK_K, dequantised, rows first: [len(rows), BLOCK_K] (W_FIRST).
    FAST_FP4: 2**-63 times the true weights."""
    BYTES: tl.constexpr = BLOCK_K // 2
    ROWS: tl.constexpr = rows.shape[0]
    b = b0 + tl.arange(0, BYTES)
    packed = tl.load(w_blocks + rows[:, None] * K_BYTES + b[None, :], mask=row_mask[:, None] & (b[None, :] < K_BYTES),
                     other=0)
    groups = b0 // 16 + tl.arange(0, BYTES // 16)  # whole 16-byte scale groups
    scale = tl.load(w_scales + rows[:, None] * (K_BYTES // 16) + groups[None, :],
                    mask=row_mask[:, None] & (groups[None, :] < K_BYTES // 16), other=0)
    if FAST_FP4:
        scale = tl.broadcast_to(mxfp4_scale_bf16(scale)[:, :, None], (ROWS, BYTES // 16, 16))
        low, high = mxfp4_to_bf16(packed, tl.reshape(scale, (ROWS, BYTES)))
    else:
        scale = tl.broadcast_to(e8m0_times_16384(scale.to(tl.int32))[:, :, None], (ROWS, BYTES // 16, 16))
        scale = tl.reshape(scale, (ROWS, BYTES))
        packed = packed.to(tl.int32)
        low = (e2m1_over_16384(packed & 15) * scale).to(DOT_DTYPE)
        high = (e2m1_over_16384(packed >> 4) * scale).to(DOT_DTYPE)
    return tl.reshape(tl.join(low, high), (ROWS, BLOCK_K))  # byte j holds K positions 2j (low), 2j + 1 (high)


@triton.jit
def _expert_matmul(x_ptr, x_rows, stride_x, valid_m, w_blocks, w_scales, w_rows, w_mask, acc,
                   K_BYTES: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DOT_SCALED: tl.constexpr, FAST_FP4: tl.constexpr, W_FIRST: tl.constexpr = False):
    """acc + x[x_rows] @ W[w_rows]^T over the whole K, BLOCK_K values a step, on dot_scaled or our dequantise.

    W_FIRST: the dequantised weights are the dot's first operand, W[w_rows] @ x^T, summed transposed. On sm90
    that is wgmma's register operand (which must be the first), and x^T its shared-memory one, loaded ahead by
    the pipeliner; with the weights second, they go through shared memory at every step (what dot_scaled's
    own lowering avoids the same way)."""
    if W_FIRST:
        acc_t = tl.zeros((w_rows.shape[0], acc.shape[0]), dtype=tl.float32)
        for b0 in range(0, K_BYTES, BLOCK_K // 2):
            k = 2 * b0 + tl.arange(0, BLOCK_K)
            x_t = tl.load(x_ptr + x_rows[None, :] * stride_x + k[:, None],
                          mask=valid_m[None, :] & (k[:, None] < 2 * K_BYTES), other=0.0).to(DOT_DTYPE)
            w = _w_rows(w_blocks, w_scales, w_rows, w_mask, b0, K_BYTES, BLOCK_K, DOT_DTYPE, FAST_FP4)
            acc_t = tl.dot(w, x_t, acc_t, input_precision=DOT_PRECISION)
        if FAST_FP4:
            acc_t = acc_t * X_SHIFT  # the weights came out 2**-63 too small
        return acc + tl.trans(acc_t)
    for b0 in range(0, K_BYTES, BLOCK_K // 2):
        b = b0 + tl.arange(0, BLOCK_K // 2)
        if DOT_SCALED:
            x = _x_tile(x_ptr, x_rows, stride_x, valid_m, b0, K_BYTES, BLOCK_K)
            acc = _dot_mxfp4(x, w_blocks, w_scales, w_rows, w_mask, b, b0, K_BYTES, BLOCK_K, acc)
        else:
            x_even, x_odd = _even_odd(x_ptr, x_rows, stride_x, valid_m, b, K_BYTES, DOT_DTYPE, FAST_FP4)
            acc = _dot_dequant(x_even, x_odd, w_blocks, w_scales, w_rows, w_mask, b, K_BYTES, DOT_DTYPE,
                               DOT_PRECISION, acc, FAST_FP4, b0)
    return acc


@triton.jit
def _f16_step_x(x_ptr, rows, K: tl.constexpr, valid, step):
    """Activations of `rows` for the two scale groups of K step `step`, transposed: ((even, odd) of the first
    group, (even, odd) of the second), each [16, len(rows)] fp16, from the F16 layout (f16_input). One load of
    64 contiguous values a row, split in registers: a load of 16 would give each thread one value."""
    x = tl.load(x_ptr + rows[None, :] * K + step * 64 + tl.arange(0, 64)[:, None], mask=valid[None, :], other=0.0)
    x = tl.permute(tl.reshape(x, (2, 2, 16, rows.shape[0])), (2, 3, 0, 1))  # (k, row, group, even / odd)
    even, odd = tl.split(x)
    even0, even1 = tl.split(even)
    odd0, odd1 = tl.split(odd)
    return even0, odd0, even1, odd1


@triton.jit
def _f16_matmul(x_ptr, rows_a, valid_a, rows_b, valid_b, w_blocks, w_scales, w_rows, w_mask, K_BYTES: tl.constexpr,
                TWO: tl.constexpr):
    """(W[w_rows] @ x[rows_a]^T, the same for rows_b if TWO), each [len(w_rows), 8] in float32, over the whole K,
    two 32-value scale groups a step, times 2**-14 and x's power of two (undone by the caller).

    The codes become fp16 code * 2**-14 with no scale (mxfp4_codes_f16: 11 instructions for 8 codes), and the
    dots run on fp16 with the weights first: a thread's sums then share few weight rows, so few scales to apply
    to each group's sums. Pairs go in 8s (mma.sync's narrowest N; at 16 Triton picks wgmma, whose register
    operand costs shuffles here), and 16 pairs are two dots on one decode. A step's two scales a row are loaded
    a step ahead (byte loads are not pipelined otherwise)."""
    GROUPS: tl.constexpr = K_BYTES // 16
    tl.static_assert(GROUPS % 2 == 0, "F16 takes K in steps of 64 values")
    acc_a = tl.zeros((w_rows.shape[0], 8), dtype=tl.float32)
    acc_b = tl.zeros((w_rows.shape[0], 8), dtype=tl.float32)
    cols = tl.arange(0, 2)
    scale_rows = w_scales + w_rows[:, None] * GROUPS + cols[None, :]
    scales = tl.load(scale_rows, mask=w_mask[:, None], other=0).to(tl.int32)
    for step in range(0, GROUPS // 2):
        following = tl.load(scale_rows + 2 * (step + 1), mask=w_mask[:, None] & (step + 1 < GROUPS // 2),
                            other=0).to(tl.int32)
        xa = _f16_step_x(x_ptr, rows_a, 2 * K_BYTES, valid_a, step)
        if TWO:
            xb = _f16_step_x(x_ptr, rows_b, 2 * K_BYTES, valid_b, step)
        for g in tl.static_range(2):
            b = (2 * step + g) * 16 + tl.arange(0, 16)
            packed = tl.load(w_blocks + w_rows[:, None] * K_BYTES + b[None, :], mask=w_mask[:, None], other=0)
            w_even, w_odd = mxfp4_codes_f16(packed)
            scale = tl.sum(tl.where(cols[None, :] == g, scales, 0), axis=1)  # the row's scale of group g
            scale = (scale << 23).to(tl.float32, bitcast=True)[:, None]
            acc_a += tl.dot(w_odd, xa[2 * g + 1], tl.dot(w_even, xa[2 * g])) * scale
            if TWO:
                acc_b += tl.dot(w_odd, xb[2 * g + 1], tl.dot(w_even, xb[2 * g])) * scale
        scales = following
    return acc_a, acc_b


@triton.jit
def _f16_pairs(pair_ids_ptr, tile, half: tl.constexpr, BLOCK_M: tl.constexpr, TOPK: tl.constexpr):
    """(pair ids, valid, tokens) of the 8 pairs `half` of tile `tile` (16-pair tiles have two halves)."""
    pairs = tl.load(pair_ids_ptr + tile * BLOCK_M + half * 8 + tl.arange(0, 8)).to(tl.int64)
    valid = pairs >= 0
    return pairs, valid, tl.where(valid, pairs // TOPK, 0)


@triton.jit
def _f16_tile(pair_ids_ptr, tile_expert_ptr, BLOCK_M: tl.constexpr, TOPK: tl.constexpr):
    """This program's tile: its expert (-1: an empty tile, nothing to do), then (pair ids, valid, tokens) of its
    two halves (the same half twice for 8-pair tiles)."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    pairs_a, valid_a, tokens_a = _f16_pairs(pair_ids_ptr, tile, 0, BLOCK_M, TOPK)
    pairs_b, valid_b, tokens_b = _f16_pairs(pair_ids_ptr, tile, BLOCK_M // 8 - 1, BLOCK_M, TOPK)
    return expert, pairs_a, valid_a, tokens_a, pairs_b, valid_b, tokens_b


@triton.jit
def _mlp1_f16_store(acc_t, pairs, valid, mult, rows, row_mask, offs_n, bias_ptr, h_ptr, alpha, limit,
                    INTER: tl.constexpr, BLOCK_N: tl.constexpr, H_DTYPE: tl.constexpr, H_EXP: tl.constexpr):
    """swiglu of 8 pairs' sums (acc_t [2*BLOCK_N, 8], rows gate/linear interleaved) into h: rounded to the
    model's dtype, then times 2**H_EXP in fp16."""
    acc = tl.trans(acc_t) * (16384.0 / mult)[:, None]
    acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    gate, lin = tl.split(tl.reshape(acc, (8, BLOCK_N, 2)))
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    out = (gate * tl.sigmoid(alpha * gate) * (lin + 1.0)).to(H_DTYPE).to(tl.float32) * (2.0**H_EXP)
    tl.store(h_ptr + pairs[:, None] * INTER + f16_position(offs_n)[None, :], out.to(tl.float16),
             mask=valid[:, None] & (offs_n < INTER)[None, :])


@triton.jit
def _mlp1_swiglu_f16_kernel(
    x_ptr, x_mult_ptr, pair_ids_ptr, tile_expert_ptr, w_blocks, w_scales, bias_ptr, h_ptr,
    INTER: tl.constexpr, HIDDEN: tl.constexpr, TOPK: tl.constexpr, alpha, limit, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, H_DTYPE: tl.constexpr, H_EXP: tl.constexpr, PDL: tl.constexpr = False,
):
    """mlp1 + swiglu on the F16 path (see _f16_matmul): a tile of BLOCK_M (8 or 16) pairs x BLOCK_N output pairs."""
    pdl_start(PDL)
    expert, pairs_a, valid_a, tokens_a, pairs_b, valid_b, tokens_b = _f16_tile(pair_ids_ptr, tile_expert_ptr,
                                                                               BLOCK_M, TOPK)
    if expert < 0:
        return
    TWO: tl.constexpr = BLOCK_M == 16
    rows = expert * (2 * INTER) + tl.program_id(1) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
    row_mask = rows < (expert + 1) * (2 * INTER)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_a, acc_b = _f16_matmul(x_ptr, tokens_a, valid_a, tokens_b, valid_b, w_blocks, w_scales, rows, row_mask,
                               HIDDEN // 2, TWO)
    mult_a = tl.load(x_mult_ptr + tokens_a, mask=valid_a, other=1.0)
    _mlp1_f16_store(acc_a, pairs_a, valid_a, mult_a, rows, row_mask, offs_n, bias_ptr, h_ptr, alpha, limit, INTER,
                    BLOCK_N, H_DTYPE, H_EXP)
    if TWO:
        mult_b = tl.load(x_mult_ptr + tokens_b, mask=valid_b, other=1.0)
        _mlp1_f16_store(acc_b, pairs_b, valid_b, mult_b, rows, row_mask, offs_n, bias_ptr, h_ptr, alpha, limit,
                        INTER, BLOCK_N, H_DTYPE, H_EXP)


@triton.jit
def _mlp2_f16_add(acc_t, pairs, valid, rows, offs_n, mask_n, bias_ptr, route_w_ptr, out_ptr, stride_out,
                  TOPK: tl.constexpr, H_EXP: tl.constexpr):
    """router weight * (8 pairs' sums + bias) added into their tokens' float32 rows of out."""
    y = tl.trans(acc_t) * (2.0 ** (14 - H_EXP))
    y += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    safe = tl.where(valid, pairs, 0)
    y = y * tl.load(route_w_ptr + safe, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.atomic_add(out_ptr + (safe // TOPK)[:, None] * stride_out + offs_n[None, :], y,
                  mask=valid[:, None] & mask_n[None, :], sem="relaxed")


@triton.jit
def _mlp2_combine_f16_kernel(
    h_ptr, pair_ids_ptr, tile_expert_ptr, route_w_ptr, w_blocks, w_scales, bias_ptr, out_ptr, stride_out,
    HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    H_EXP: tl.constexpr, PDL: tl.constexpr = False,
):
    """mlp2 + bias + router weight on the F16 path, h as mlp1's F16 kernel writes it."""
    pdl_start(PDL)
    expert, pairs_a, valid_a, _, pairs_b, valid_b, _ = _f16_tile(pair_ids_ptr, tile_expert_ptr, BLOCK_M, TOPK)
    if expert < 0:
        return
    TWO: tl.constexpr = BLOCK_M == 16
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < HIDDEN
    rows = expert * HIDDEN + offs_n
    acc_a, acc_b = _f16_matmul(h_ptr, tl.where(valid_a, pairs_a, 0), valid_a, tl.where(valid_b, pairs_b, 0),
                               valid_b, w_blocks, w_scales, rows, mask_n, INTER // 2, TWO)
    _mlp2_f16_add(acc_a, pairs_a, valid_a, rows, offs_n, mask_n, bias_ptr, route_w_ptr, out_ptr, stride_out, TOPK,
                  H_EXP)
    if TWO:
        _mlp2_f16_add(acc_b, pairs_b, valid_b, rows, offs_n, mask_n, bias_ptr, route_w_ptr, out_ptr, stride_out,
                      TOPK, H_EXP)


@triton.jit
def _mlp1_swiglu_grouped_kernel(
    x_ptr, stride_x, pair_ids_ptr, tile_expert_ptr, w_blocks, w_scales, bias_ptr, h_ptr,
    INTER: tl.constexpr, HIDDEN: tl.constexpr, TOPK: tl.constexpr, alpha, limit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_SCALED: tl.constexpr = False, FAST_FP4: tl.constexpr = False, ONE_DOT: tl.constexpr = False,
    W_FIRST: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(pair_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid_m = pairs >= 0
    tokens = tl.where(valid_m, pairs // TOPK, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < INTER
    K_BYTES: tl.constexpr = HIDDEN // 2
    if ONE_DOT:  # gate and linear rows (2i, 2i+1) as one block of 2*BLOCK_N rows: one accumulator, one dot a step
        rows = expert * (2 * INTER) + tl.program_id(1) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
        row_mask = rows < (expert + 1) * (2 * INTER)
        acc = _expert_matmul(x_ptr, tokens, stride_x, valid_m, w_blocks, w_scales, rows, row_mask,
                             tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32), K_BYTES, BLOCK_K, DOT_DTYPE,
                             DOT_PRECISION, DOT_SCALED, FAST_FP4, W_FIRST)
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        gate, lin = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        tl.static_assert(not W_FIRST, "W_FIRST runs with ONE_DOT")
        gate_rows = expert * (2 * INTER) + 2 * offs_n
        lin_rows = gate_rows + 1
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_lin = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b0 in range(0, K_BYTES, BLOCK_K // 2):
            b = b0 + tl.arange(0, BLOCK_K // 2)
            if DOT_SCALED:
                x = _x_tile(x_ptr, tokens, stride_x, valid_m, b0, K_BYTES, BLOCK_K)
                acc_gate = _dot_mxfp4(x, w_blocks, w_scales, gate_rows, mask_n, b, b0, K_BYTES, BLOCK_K, acc_gate)
                acc_lin = _dot_mxfp4(x, w_blocks, w_scales, lin_rows, mask_n, b, b0, K_BYTES, BLOCK_K, acc_lin)
            else:
                x_even, x_odd = _even_odd(x_ptr, tokens, stride_x, valid_m, b, K_BYTES, DOT_DTYPE, FAST_FP4)
                acc_gate = _dot_dequant(x_even, x_odd, w_blocks, w_scales, gate_rows, mask_n, b, K_BYTES, DOT_DTYPE,
                                        DOT_PRECISION, acc_gate, FAST_FP4, b0)
                acc_lin = _dot_dequant(x_even, x_odd, w_blocks, w_scales, lin_rows, mask_n, b, K_BYTES, DOT_DTYPE,
                                       DOT_PRECISION, acc_lin, FAST_FP4, b0)
        gate = acc_gate + tl.load(bias_ptr + gate_rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        lin = acc_lin + tl.load(bias_ptr + lin_rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    out = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    tl.store(h_ptr + pairs[:, None] * INTER + offs_n[None, :], out.to(h_ptr.dtype.element_ty),
             mask=valid_m[:, None] & mask_n[None, :])


@triton.jit
def _mlp2_combine_grouped_kernel(
    h_ptr, pair_ids_ptr, tile_expert_ptr, route_w_ptr, w_blocks, w_scales, bias_ptr, out_ptr, stride_out,
    HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_SCALED: tl.constexpr = False, FAST_FP4: tl.constexpr = False, W_FIRST: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(pair_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid_m = pairs >= 0
    safe_pairs = tl.where(valid_m, pairs, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < HIDDEN
    rows = expert * HIDDEN + offs_n
    K_BYTES: tl.constexpr = INTER // 2
    acc = _expert_matmul(h_ptr, safe_pairs, INTER, valid_m, w_blocks, w_scales, rows, mask_n,
                         tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), K_BYTES, BLOCK_K, DOT_DTYPE, DOT_PRECISION,
                         DOT_SCALED, FAST_FP4, W_FIRST)
    y = acc + tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y * tl.load(route_w_ptr + safe_pairs, mask=valid_m, other=0.0).to(tl.float32)[:, None]
    tokens = safe_pairs // TOPK
    tl.atomic_add(out_ptr + tokens[:, None] * stride_out + offs_n[None, :], y,
                  mask=valid_m[:, None] & mask_n[None, :], sem="relaxed")


@triton.jit
def f16_position(k):
    """Where value k of a row sits in the F16 layout: each 32-value scale group as its 16 even positions, then
    its 16 odd ones, so that the even and the odd halves of a group are each one contiguous load."""
    return (k // 32) * 32 + (k % 2) * 16 + (k % 32) // 2


@triton.jit
def _f16_input_kernel(x_ptr, stride_x, data_ptr, mult_ptr, K: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr = False):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    mult = ((half_exponent(tl.max(tl.abs(x), axis=0)) + 127) << 23).to(tl.float32, bitcast=True)
    tl.store(data_ptr + row * K + f16_position(cols), (x * mult).to(tl.float16), mask=cols < K)
    tl.store(mult_ptr + row, mult)


def f16_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] as the F16 path reads it: (fp16 [T, K] in the F16 layout (f16_position), each row times the power
    of two that puts its largest |x| into [2**13, 2**14) (moe_gemv.half_exponent); those factors, float32 [T])."""
    data = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    mult = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _f16_input_kernel[(x.shape[0],)](x, x.stride(0), data, mult, K=x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]),
                                     **pdl(x.device))
    return data, mult


def _paths(launch: dict) -> dict:
    """A kernel's launch settings with the dot paths that can run: dot_scaled takes the packed weights as they
    are (no FAST_FP4 decode, no W_FIRST order); FAST_FP4's inline PTX needs compiled bf16 dots (not the
    interpreter, not fp16 or fp32 activations)."""
    scaled = launch["DOT_SCALED"]
    return launch | dict(FAST_FP4=launch["FAST_FP4"] and launch["DOT_DTYPE"] == tl.bfloat16 and not scaled,
                         W_FIRST=launch["W_FIRST"] and not scaled)


def moe_grouped(
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
    config: dict | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    x_f16: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The MoE block for many tokens: x [T, H] -> [T, H] in x's dtype (see kernels.reference.moe); with
    `residual`, residual + the block, summed in float32.
    out: a float32 [T, H] buffer that holds the residual: the block is summed into it in place and it is
    returned as it is (float32; no launch to copy the residual in, none to cast the result).

    `config` overrides entries of the block table (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, and MLP2:
    a dict of BLOCK_N, BLOCK_K, num_warps, num_stages for the mlp2 kernel alone; F16).
    x_f16: x as the F16 path reads it (f16_input(x)), made here when missing. F16 runs compiled, for bf16 / fp16 x,
    unless KUBRICK_GEMV_HALF=0; elsewhere the config's F16 is ignored (the tl.dot path runs).
    """
    tokens, hidden = x.shape
    topk = expert_ids.shape[1]
    n_experts = mlp1_blocks.shape[0]
    inter = mlp1_blocks.shape[1] // 2
    for t in (mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales, expert_weights):
        assert t.is_contiguous()
    assert x.stride(-1) == 1 and hidden % 32 == 0 and inter % 32 == 0
    small = block_config("moe_grouped_small", x.device)
    table = "moe_grouped_small" if expert_ids.numel() <= small.get("MAX_PAIRS", SMALL_PAIRS) else "moe_grouped"
    cfg = block_config(table, x.device) | (config or {})
    # The CPU interpreter computes bf16 tl.dot wrong (FACTS.md): it gets float32 operands instead; float32
    # dots run in IEEE fp32, not TF32.
    dot_dtype = tl.float32 if interpreting() or x.dtype == torch.float32 else tl.bfloat16
    if x.dtype == torch.float16 and not interpreting():
        dot_dtype = tl.float16
    dot_precision = "ieee" if dot_dtype == tl.float32 else None
    block_m = cfg["BLOCK_M"]
    pair_ids, tile_expert = group_by_expert(expert_ids, n_experts, block_m)
    tiles = tile_expert.numel()
    # F16 (opt-in, in no table: 2-7 % behind the small table on the H100, BENCHMARKS.md run 34): fp16 codes and
    # activations, each group's sums scaled in float32 (_f16_matmul). KUBRICK_GEMV_HALF=0 rules it out too.
    f16 = cfg.get("F16", False) and dot_dtype != tl.float32 and uses_half(x.dtype, x.device, dict(HALF=True))
    if f16:
        assert block_m in (8, 16) and math.isfinite(swiglu_limit), "F16 takes 8 or 16 pairs a tile, and a clamp"
        assert hidden % 64 == 0 and inter % 64 == 0, "F16 takes K in steps of 64 values"
        x_data, x_mult = f16_input(x) if x_f16 is None else x_f16
        assert x_data.shape == x.shape and x_data.dtype == torch.float16 and x_mult.shape == (tokens,)
        h = torch.empty(tokens * topk, inter, dtype=torch.float16, device=x.device)
        h_exp = h_exponent(swiglu_limit)
        _mlp1_swiglu_f16_kernel[(tiles, triton.cdiv(inter, cfg["BLOCK_N"]))](
            x_data, x_mult, pair_ids, tile_expert, mlp1_blocks, mlp1_scales, mlp1_bias, h,
            INTER=inter, HIDDEN=hidden, TOPK=topk, alpha=swiglu_alpha, limit=swiglu_limit, BLOCK_M=block_m,
            BLOCK_N=cfg["BLOCK_N"], H_DTYPE=_TL_DTYPE[x.dtype], H_EXP=h_exp, **pdl(x.device),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    else:
        h = torch.empty(tokens * topk, inter, dtype=x.dtype, device=x.device)
        asked = dict(BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], DOT_DTYPE=dot_dtype,
                     DOT_PRECISION=dot_precision, DOT_SCALED=cfg.get("DOT_SCALED", False),
                     FAST_FP4=cfg.get("FAST_FP4", False), W_FIRST=cfg.get("W_FIRST", False),
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        common = _paths(asked)
        _mlp1_swiglu_grouped_kernel[(tiles, triton.cdiv(inter, cfg["BLOCK_N"]))](
            x, x.stride(0), pair_ids, tile_expert, mlp1_blocks, mlp1_scales, mlp1_bias, h,
            INTER=inter, HIDDEN=hidden, TOPK=topk, alpha=swiglu_alpha, limit=swiglu_limit,
            ONE_DOT=cfg.get("ONE_DOT", False) or common["W_FIRST"], **common, **pdl(x.device),
        )
    # mlp2 adds its experts' rows into float32 out, which starts as the residual: one rounding, one launch less.
    accumulate = out is not None
    if accumulate:
        assert residual is None and out.dtype == torch.float32 and out.shape == (tokens, hidden) and out.stride(-1) == 1
    elif residual is None:
        out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
    else:
        out = residual.to(torch.float32, copy=True)
    cfg2 = cfg | cfg.get("MLP2", {})  # mlp2's own tile (its K is the intermediate size, its N hidden)
    if f16:
        _mlp2_combine_f16_kernel[(tiles, triton.cdiv(hidden, cfg2["BLOCK_N"]))](
            h, pair_ids, tile_expert, expert_weights, mlp2_blocks, mlp2_scales, mlp2_bias, out, out.stride(0),
            HIDDEN=hidden, INTER=inter, TOPK=topk, BLOCK_M=block_m, BLOCK_N=cfg2["BLOCK_N"], H_EXP=h_exp,
            **pdl(x.device), num_warps=cfg2["num_warps"], num_stages=cfg2["num_stages"],
        )
    else:
        common2 = _paths(asked | cfg.get("MLP2", {}))
        _mlp2_combine_grouped_kernel[(tiles, triton.cdiv(hidden, common2["BLOCK_N"]))](
            h, pair_ids, tile_expert, expert_weights, mlp2_blocks, mlp2_scales, mlp2_bias, out, out.stride(0),
            HIDDEN=hidden, INTER=inter, TOPK=topk, **common2, **pdl(x.device),
        )
    return out if accumulate else out.to(x.dtype)
