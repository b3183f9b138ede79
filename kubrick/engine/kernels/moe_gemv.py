"""MoE decode path: GEMVs over the selected experts for few tokens, MXFP4 weights dequantised in registers.

Two kernels per MoE block:
  mlp1: one program per (token, expert slot) x BLOCK_I output pairs; it reads the 2*BLOCK_I adjacent rows
        (gate 2i, linear 2i+1) of the packed weights, adds the bias and applies swiglu: h [T*k, I], x's dtype.
  mlp2: one program per token x BLOCK_N output rows x split of K; it loops over the token's k experts and sums
        router_weight * (W2 h + b2). With SPLIT_K > 1 the splits meet through float32 atomic adds; that pays
        when T * H / BLOCK_N programs would leave SMs idle.
Weights stay packed; each step covers BLOCK_K values (BLOCK_K/32 scale groups) of every row, and a group's
32-value partial sum is multiplied by its scale once (the scale factors out of each group's dot).

At batch 1 these kernels are bound by integer work, not memory: every 4-bit code must become a float. Two
decoders, chosen by the DECODE entry of the block table (both tested):
  "swar": four packed bytes are read as one 32-bit word and turned into four words of two bf16 bit patterns
          each with 19 mask/shift ops (SIMD within a register); a bf16 pattern becomes a float32 by a shift
          or a mask. The patterns put the 3 magnitude bits at the bottom of the bf16 exponent, so code 1
          (0.5) is a float32 subnormal: every value is true * 2**-126, undone by scaling x up by 2**64 and
          the group sums by 2**62 (no overflow or underflow on the way).
  "swar_x_per_row": the same, with x loaded in the weight tile's shape (see _swar_step).
  "f16":  one code at a time through an fp16 bit pattern and a conversion (simpler, slower).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import block_config, e2m1_over_16384, e8m0_times_16384, num_sms


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
def _x_scaled(base, offset: tl.constexpr, in_k):
    """x at K position 8 * word + offset, times 2**64 (see the module docstring)."""
    return tl.load(base + offset, mask=in_k, other=0.0).to(tl.float32) * 1.8446744073709552e19


@triton.jit
def _swar_step(w_words, w_scales, rows, row_mask, x_row, w0, K_WORDS: tl.constexpr, NSB: tl.constexpr,
               X_PER_ROW: tl.constexpr):
    """One K step of the "swar" decoder: sum_k W[rows, k] x[k] over words w0 .. w0 + 4*NSB -> [R, NSB] float32.

    X_PER_ROW: load x already broadcast to the weight tile's shape (every thread reads the x values it needs
    from L1) instead of once per step and broadcast in registers, which can cost a layout shuffle.
    """
    sb = tl.arange(0, NSB)
    q = tl.arange(0, 4)
    word = w0 + sb[None, :, None] * 4 + q[None, None, :]  # [1, NSB, 4]
    in_k = word < K_WORDS
    w = tl.load(w_words + rows[:, None, None] * K_WORDS + word, mask=row_mask[:, None, None] & in_k, other=0)
    w = w.to(tl.uint32, bitcast=True)
    a = ((w & 0x00080008) << 12) | ((w & 0x00070007) << 6)  # codes 0 and 4 of the word
    b = ((w & 0x00800080) << 8) | ((w & 0x00700070) << 2)  # codes 1 and 5
    c = ((w & 0x08000800) << 4) | ((w & 0x07000700) >> 2)  # codes 2 and 6
    d = (w & 0x80008000) | ((w & 0x70007000) >> 6)  # codes 3 and 7
    base = x_row + 8 * word
    if X_PER_ROW:
        base += 0 * rows[:, None, None]
    # Word pair (lo, hi) of a holds codes (0, 4) of the word, b (1, 5), c (2, 6), d (3, 7).
    part = _lo(a) * _x_scaled(base, 0, in_k) + _hi(a) * _x_scaled(base, 4, in_k)
    part += _lo(b) * _x_scaled(base, 1, in_k) + _hi(b) * _x_scaled(base, 5, in_k)
    part += _lo(c) * _x_scaled(base, 2, in_k) + _hi(c) * _x_scaled(base, 6, in_k)
    part += _lo(d) * _x_scaled(base, 3, in_k) + _hi(d) * _x_scaled(base, 7, in_k)
    scol = w0 // 4 + sb[None, :]
    scale = tl.load(w_scales + rows[:, None] * (K_WORDS // 4) + scol, mask=row_mask[:, None] & (scol < K_WORDS // 4),
                    other=0).to(tl.int32)
    return tl.sum(part, axis=2) * 4.611686018427388e18 * _e8m0(scale)  # * 2**62 undoes 2**-126 * 2**64


@triton.jit
def _f16_step(w_bytes, w_scales, rows, row_mask, x_row, w0, K_WORDS: tl.constexpr, NSB: tl.constexpr):
    """One K step of the "f16" decoder (same contract as _swar_step; w0 counts 4-byte words)."""
    K_BYTES: tl.constexpr = 4 * K_WORDS
    sb = tl.arange(0, NSB)
    byte = tl.arange(0, 16)
    col = 4 * w0 + sb[None, :, None] * 16 + byte[None, None, :]  # byte column within the row
    in_k = col < K_BYTES
    packed = tl.load(w_bytes + rows[:, None, None] * K_BYTES + col, mask=row_mask[:, None, None] & in_k, other=0)
    packed = packed.to(tl.int32)
    x_even = tl.load(x_row + 2 * col, mask=in_k, other=0.0).to(tl.float32)
    x_odd = tl.load(x_row + 2 * col + 1, mask=in_k, other=0.0).to(tl.float32)
    part = e2m1_over_16384(packed & 15) * x_even + e2m1_over_16384(packed >> 4) * x_odd
    scol = w0 // 4 + sb[None, :]
    scale = tl.load(w_scales + rows[:, None] * (K_WORDS // 4) + scol, mask=row_mask[:, None] & (scol < K_WORDS // 4),
                    other=0).to(tl.int32)
    return tl.sum(part, axis=2) * e8m0_times_16384(scale)


@triton.jit
def _mlp1_swiglu_gemv_kernel(
    x_ptr, stride_x, ids_ptr, w_blocks, w_scales, bias_ptr, h_ptr,
    INTER: tl.constexpr, HIDDEN: tl.constexpr, TOPK: tl.constexpr, alpha, limit,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, SWAR: tl.constexpr, X_PER_ROW: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)  # token * TOPK + slot
    token = pair // TOPK
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    local = tl.program_id(1) * (2 * BLOCK_I) + tl.arange(0, 2 * BLOCK_I)  # gate and linear rows, interleaved
    row_mask = local < 2 * INTER
    rows = expert * (2 * INTER) + local
    K_WORDS: tl.constexpr = HIDDEN // 8
    NSB: tl.constexpr = BLOCK_K // 32
    x_row = x_ptr + token * stride_x
    acc = tl.zeros((2 * BLOCK_I, NSB), dtype=tl.float32)
    for w0 in range(0, K_WORDS, BLOCK_K // 8):
        if SWAR:
            acc += _swar_step(w_blocks, w_scales, rows, row_mask, x_row, w0, K_WORDS, NSB, X_PER_ROW)
        else:
            acc += _f16_step(w_blocks, w_scales, rows, row_mask, x_row, w0, K_WORDS, NSB)
    y = tl.sum(acc, axis=1) + tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    gate, lin = tl.split(tl.reshape(y, (BLOCK_I, 2)))
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    out = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    tl.store(h_ptr + pair * INTER + offs_i, out.to(h_ptr.dtype.element_ty), mask=offs_i < INTER)


@triton.jit
def _mlp2_combine_gemv_kernel(
    h_ptr, ids_ptr, route_w_ptr, w_blocks, w_scales, bias_ptr, out_ptr, stride_out,
    HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
    SWAR: tl.constexpr, X_PER_ROW: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < HIDDEN
    split = tl.program_id(2)
    K_WORDS: tl.constexpr = INTER // 8
    NSB: tl.constexpr = BLOCK_K // 32
    w_start = split * (K_PER_SPLIT // 8)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in tl.static_range(TOPK):
        pair = token * TOPK + slot
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        rows = expert * HIDDEN + offs_n
        acc = tl.zeros((BLOCK_N, NSB), dtype=tl.float32)
        for w0 in range(w_start, w_start + K_PER_SPLIT // 8, BLOCK_K // 8):
            if SWAR:
                acc += _swar_step(w_blocks, w_scales, rows, mask_n, h_ptr + pair * INTER, w0, K_WORDS, NSB, X_PER_ROW)
            else:
                acc += _f16_step(w_blocks, w_scales, rows, mask_n, h_ptr + pair * INTER, w0, K_WORDS, NSB)
        y = tl.sum(acc, axis=1)
        if split == 0:
            y += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
        total += tl.load(route_w_ptr + pair).to(tl.float32) * y
    if SPLIT_K == 1:
        tl.store(out_ptr + token * stride_out + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptr + token * stride_out + offs_n, total, mask=mask_n, sem="relaxed")


def pick_split_k(tokens: int, hidden: int, inter: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Split K of mlp2 until there are about two programs per SM (never below one K step per split)."""
    programs = tokens * triton.cdiv(hidden, block_n)
    split = 1
    while programs * split < 2 * num_sms(device) and inter // (split * 2) >= block_k:
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
) -> torch.Tensor:
    """The MoE block for a few tokens: x [T, H] -> [T, H] in x's dtype (see kernels.reference.moe).

    `config` overrides entries of the block table (BLOCK_I, BLOCK_N, BLOCK_K, num_warps, DECODE).
    """
    tokens, hidden = x.shape
    topk = expert_ids.shape[1]
    inter = mlp1_blocks.shape[1] // 2
    for t in (mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales, expert_ids, expert_weights):
        assert t.is_contiguous()
    assert x.stride(-1) == 1 and hidden % 32 == 0 and inter % 32 == 0
    cfg = block_config("moe_gemv", x.device) | (config or {})
    swar = cfg["DECODE"] in ("swar", "swar_x_per_row")
    x_per_row = cfg["DECODE"] == "swar_x_per_row"
    # The swar decoder reads 4 packed bytes as one int32 word; the f16 one reads bytes.
    w1 = mlp1_blocks.view(torch.int32) if swar else mlp1_blocks
    w2 = mlp2_blocks.view(torch.int32) if swar else mlp2_blocks
    h = torch.empty(tokens * topk, inter, dtype=x.dtype, device=x.device)
    grid1 = (tokens * topk, triton.cdiv(inter, cfg["BLOCK_I"]))
    _mlp1_swiglu_gemv_kernel[grid1](
        x, x.stride(0), expert_ids, w1, mlp1_scales, mlp1_bias, h,
        INTER=inter, HIDDEN=hidden, TOPK=topk, alpha=swiglu_alpha, limit=swiglu_limit,
        BLOCK_I=cfg["BLOCK_I"], BLOCK_K=cfg["BLOCK_K"], SWAR=swar, X_PER_ROW=x_per_row, num_warps=cfg["num_warps"],
    )
    block_k = cfg["BLOCK_K"]
    if split_k is None:
        split_k = pick_split_k(tokens, hidden, inter, cfg["BLOCK_N"], block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(inter, split_k), block_k) * block_k
    if split_k == 1:
        out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
    grid2 = (tokens, triton.cdiv(hidden, cfg["BLOCK_N"]), split_k)
    _mlp2_combine_gemv_kernel[grid2](
        h, expert_ids, expert_weights, w2, mlp2_scales, mlp2_bias, out, out.stride(0),
        HIDDEN=hidden, INTER=inter, TOPK=topk, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        K_PER_SPLIT=k_per_split, SPLIT_K=split_k, SWAR=swar, X_PER_ROW=x_per_row, num_warps=cfg["num_warps"],
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)
