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

On sm90, calls of at most the moe_wgmma_mid table entry's MAX_PAIRS pairs (1024 tokens) go to moe_wgmma.py (Gluon
kernels that decode straight into wgmma's register operand) instead of these kernels.

A path on fp16 codes scaled per 32-value group (F16, BENCHMARKS.md run 34) measured 2-7 % behind the small table
on the H100 and was removed; ec2c9e8 has it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import (
    X_SHIFT,
    block_config,
    e2m1_over_16384,
    e8m0_times_16384,
    interpreting,
    mlp2_sum,
    mxfp4_scale_bf16,
    mxfp4_to_bf16,
    pdl,
    pdl_start,
)


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


# Above this many pairs, one program per chunk of pairs (two launches) beats one program walking them all: the
# single program took 100 us a layer at 8,192 pairs (2,048 tokens) on the H100, 4 % of a prefill (run 37).
SPLIT_PAIRS = 1024


@triton.jit(do_not_specialize=["PAIRS", "SLOTS", "SPAN"])
def _count_per_chunk_kernel(ids_ptr, counts_ptr, pair_ids_ptr, PAIRS, SLOTS, SPAN, E: tl.constexpr,
                            CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Program p: how many of pairs [p*CHUNK, (p+1)*CHUNK) each expert has (counts [programs, E]), and padding (-1)
    over its SPAN slots of pair_ids, which _place_chunk_kernel then overwrites with the pairs."""
    pdl_start(PDL)
    p = tl.program_id(0)
    rows = p * CHUNK + tl.arange(0, CHUNK)
    experts = tl.arange(0, E)
    ids = tl.load(ids_ptr + rows, mask=rows < PAIRS, other=-1)
    tl.store(counts_ptr + p * E + experts, tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0))
    for s0 in range(p * SPAN, tl.minimum((p + 1) * SPAN, SLOTS), CHUNK):
        slots = s0 + tl.arange(0, CHUNK)
        padding = tl.full((CHUNK,), -1, tl.int32)
        tl.store(pair_ids_ptr + slots, padding, mask=(slots < SLOTS) & (slots < (p + 1) * SPAN))


@triton.jit(do_not_specialize=["PAIRS", "TILES"])
def _place_chunk_kernel(ids_ptr, counts_ptr, pair_ids_ptr, tile_expert_ptr, PAIRS, TILES, N_EXPERTS: tl.constexpr,
                        BLOCK_M: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, PROGRAMS: tl.constexpr,
                        PDL: tl.constexpr):
    """Program p places pairs [p*CHUNK, (p+1)*CHUNK) after the same expert's pairs of the chunks before (a stable
    sort, as _group_by_expert_kernel); program 0 also names every tile's expert."""
    pdl_start(PDL)
    p = tl.program_id(0)
    experts = tl.arange(0, E)
    chunks = tl.arange(0, PROGRAMS)
    counts = tl.load(counts_ptr + chunks[:, None] * E + experts[None, :])  # [PROGRAMS, E]
    tiles_per_expert = (tl.sum(counts, axis=0) + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles_per_expert, axis=0)
    tile_start = tile_end - tiles_per_expert
    seen = tl.sum(tl.where(chunks[:, None] < p, counts, 0), axis=0)  # this expert's pairs in the chunks before
    rows = p * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + rows, mask=rows < PAIRS, other=-1)
    hit = (ids[:, None] == experts[None, :]).to(tl.int32)
    before = tl.cumsum(hit, axis=0) - hit + seen[None, :]
    slot = tl.sum(hit * (tile_start[None, :] * BLOCK_M + before), axis=1)
    tl.store(pair_ids_ptr + slot, rows, mask=rows < PAIRS)
    if p == 0:
        for t0 in range(0, TILES, CHUNK):
            t = t0 + tl.arange(0, CHUNK)
            owner = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32), axis=1)
            tl.store(tile_expert_ptr + t, tl.where(owner < N_EXPERTS, owner, -1), mask=t < TILES)


def group_by_expert(expert_ids: torch.Tensor, n_experts: int, block_m: int,
                    split_pairs: int = SPLIT_PAIRS) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> (pair ids int32 [tiles*block_m], -1 = padding; tile expert int32 [tiles], -1 = none).

    Pairs are numbered token * k + slot; each expert's pairs appear in that order (reference.group_by_expert).
    Up to split_pairs pairs one program does it all; above, a program per chunk counts, then one per chunk places.
    """
    flat = expert_ids.reshape(-1).to(torch.int32).contiguous()
    pairs = flat.numel()
    tiles = triton.cdiv(pairs, block_m) + n_experts  # worst case: every expert's run ends in a partial tile
    pair_ids = torch.empty(tiles * block_m, dtype=torch.int32, device=flat.device)
    tile_expert = torch.empty(tiles, dtype=torch.int32, device=flat.device)
    width = triton.next_power_of_2(n_experts)
    chunk = max(16, 4096 // width)
    if pairs <= split_pairs:
        _group_by_expert_kernel[(1,)](
            flat, pair_ids, tile_expert, pairs, tiles, N_EXPERTS=n_experts, BLOCK_M=block_m, E=width,
            CHUNK=chunk, **pdl(flat.device), num_warps=4,
        )
        return pair_ids, tile_expert
    # The program count is a power of two (the place kernel loads every chunk's counts at once); the programs past
    # the pairs count nothing and place nothing.
    programs = triton.next_power_of_2(triton.cdiv(pairs, chunk))
    counts = torch.empty(programs, width, dtype=torch.int32, device=flat.device)
    _count_per_chunk_kernel[(programs,)](flat, counts, pair_ids, pairs, tiles * block_m,
                                         triton.cdiv(tiles * block_m, programs), E=width, CHUNK=chunk,
                                         **pdl(flat.device), num_warps=4)
    _place_chunk_kernel[(programs,)](flat, counts, pair_ids, tile_expert, pairs, tiles, N_EXPERTS=n_experts,
                                     BLOCK_M=block_m, E=width, CHUNK=chunk, PROGRAMS=programs, **pdl(flat.device),
                                     num_warps=4)
    return pair_ids, tile_expert


@triton.jit
def _decode_bytes(packed, mult, DOT_DTYPE: tl.constexpr, FAST_FP4: tl.constexpr):
    """Packed bytes (uint8) and each byte's multiplier (same shape: FAST_FP4 mxfp4_scale_bf16's bf16, else
    e8m0_times_16384's float32) -> (low nibbles, high nibbles) dequantised; FAST_FP4: 2**-63 times too small."""
    if FAST_FP4:
        return mxfp4_to_bf16(packed, mult)
    packed = packed.to(tl.int32)
    return (e2m1_over_16384(packed & 15) * mult).to(DOT_DTYPE), (e2m1_over_16384(packed >> 4) * mult).to(DOT_DTYPE)


@triton.jit
def _dequant_tile(w_blocks, w_scales, rows, row_mask, b, K_BYTES: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  FAST_FP4: tl.constexpr = False, b0=0):
    """Weights of `rows` at byte columns b, transposed for tl.dot: (low nibbles, high nibbles), each [len(b), len(rows)].
    FAST_FP4: bf16 from inline PTX, 2**-63 times the true weights (_common.mxfp4_to_bf16)."""
    mask = (b[:, None] < K_BYTES) & row_mask[None, :]
    packed = tl.load(w_blocks + rows[None, :] * K_BYTES + b[:, None], mask=mask, other=0)
    if FAST_FP4:
        BYTES: tl.constexpr = b.shape[0]
        ROWS: tl.constexpr = rows.shape[0]
        groups = b0 // 16 + tl.arange(0, BYTES // 16)  # b = b0 + arange: whole 16-byte scale groups
        scale = tl.load(w_scales + rows[None, :] * (K_BYTES // 16) + groups[:, None],
                        mask=(groups[:, None] < K_BYTES // 16) & row_mask[None, :], other=0)
        mult = tl.reshape(tl.broadcast_to(mxfp4_scale_bf16(scale)[:, None, :], (BYTES // 16, 16, ROWS)), (BYTES, ROWS))
    else:
        scale = tl.load(w_scales + rows[None, :] * (K_BYTES // 16) + b[:, None] // 16, mask=mask, other=0)
        mult = e8m0_times_16384(scale.to(tl.int32))
    return _decode_bytes(packed, mult, DOT_DTYPE, FAST_FP4)


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
    mult = mxfp4_scale_bf16(scale) if FAST_FP4 else e8m0_times_16384(scale.to(tl.int32))  # a group's, then each byte's
    mult = tl.reshape(tl.broadcast_to(mult[:, :, None], (ROWS, BYTES // 16, 16)), (ROWS, BYTES))
    low, high = _decode_bytes(packed, mult, DOT_DTYPE, FAST_FP4)
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


def _paths(launch: dict) -> dict:
    """A kernel's launch settings with the dot paths that can run: dot_scaled takes the packed weights as they
    are (no FAST_FP4 decode, no W_FIRST order); FAST_FP4's inline PTX needs compiled bf16 dots (not the
    interpreter, not fp16 or fp32 activations)."""
    scaled = launch["DOT_SCALED"]
    return launch | dict(FAST_FP4=launch["FAST_FP4"] and launch["DOT_DTYPE"] == tl.bfloat16 and not scaled,
                         W_FIRST=launch["W_FIRST"] and not scaled)


def _wgmma_config(x: torch.Tensor, pairs: int, inter: int, config: dict | None) -> dict | None:
    """The launch settings of sm90's Gluon kernels (moe_wgmma.py) when they take this call, else None: up to the
    block table's MAX_PAIRS of moe_wgmma_small, moe_wgmma or moe_wgmma_mid (0 on other GPUs), bf16 activations,
    shapes they support. A config names the Triton tiles' settings, so with one the Triton tiles run (unless
    WGMMA=True)."""
    if x.dtype != torch.bfloat16 or config and not config.get("WGMMA", False):
        return None
    for entry in ("moe_wgmma_small", "moe_wgmma", "moe_wgmma_mid"):  # decode batches, then prompt chunks
        cfg = block_config(entry, x.device)
        if pairs <= cfg["MAX_PAIRS"]:
            from kubrick.engine.kernels.moe_wgmma import supports

            return cfg if supports(x.shape[1], inter, cfg) else None
    return None


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
) -> torch.Tensor:
    """The MoE block for many tokens: x [T, H] -> [T, H] in x's dtype (see kernels.reference.moe); with
    `residual`, residual + the block, summed in float32.
    out: a float32 [T, H] buffer that holds the residual: the block is summed into it in place and it is
    returned as it is (float32; no launch to copy the residual in, none to cast the result).

    `config` overrides entries of the block table (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, and MLP2:
    a dict of BLOCK_N, BLOCK_K, num_warps, num_stages for the mlp2 kernel alone); with a config, these tiles run
    even where sm90 would take moe_wgmma.
    """
    tokens, hidden = x.shape
    topk = expert_ids.shape[1]
    n_experts = mlp1_blocks.shape[0]
    inter = mlp1_blocks.shape[1] // 2
    wgmma = _wgmma_config(x, expert_ids.numel(), inter, config)
    if wgmma is not None:
        from kubrick.engine.kernels.moe_wgmma import moe_wgmma

        return moe_wgmma(x, expert_ids, expert_weights, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks,
                         mlp2_scales, mlp2_bias, swiglu_alpha, swiglu_limit, wgmma, residual, out)
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
    accumulate = out is not None
    out = mlp2_sum(x, residual, out)
    common2 = _paths(asked | cfg.get("MLP2", {}))  # mlp2's own tile (its K is the intermediate size, its N hidden)
    _mlp2_combine_grouped_kernel[(tiles, triton.cdiv(hidden, common2["BLOCK_N"]))](
        h, pair_ids, tile_expert, expert_weights, mlp2_blocks, mlp2_scales, mlp2_bias, out, out.stride(0),
        HIDDEN=hidden, INTER=inter, TOPK=topk, **common2, **pdl(x.device),
    )
    return out if accumulate else out.to(x.dtype)
