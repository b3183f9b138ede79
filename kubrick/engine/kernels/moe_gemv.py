"""MoE decode path: GEMVs over the selected experts for few tokens, MXFP4 weights dequantised in registers.

Two kernels per MoE block:
  mlp1: one program per (token, expert slot) x BLOCK_I output pairs; it reads the gate row 2i and the linear
        row 2i+1 of the packed weights, adds the bias and applies swiglu, writing h [T*k, I] in x's dtype.
  mlp2: one program per token x BLOCK_N output rows x split of K; it loops over the token's k experts and sums
        router_weight * (W2 h + b2). With SPLIT_K > 1 the splits meet through float32 atomic adds; that pays
        when T * H / BLOCK_N programs would leave SMs idle (batch 1: 2880/16 = 180 programs on 132 SMs).
Weights stay packed: each step loads BLOCK_K/2 bytes per row and the BLOCK_K/32 scales that cover them; the
32-value partial sums are multiplied by their scale once (the scale factors out of each block's dot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import block_config, e2m1_over_16384, e8m0_times_16384, num_sms


@triton.jit
def _mxfp4_row_dot(w_blocks, w_scales, rows, row_mask, x_even, x_odd, b0, K_BYTES: tl.constexpr,
                   NSB: tl.constexpr):
    """sum over one K step of dequant(W[rows, 2*b0 : 2*b0 + 32*NSB]) * x -> [len(rows), NSB] float32.

    x_even / x_odd: [1, NSB, 16] float32, the values at even / odd K positions of this step.
    """
    sb = tl.arange(0, NSB)
    byte = tl.arange(0, 16)
    col = b0 + sb[None, :, None] * 16 + byte[None, None, :]  # byte column within the row
    mask = row_mask[:, None, None] & (col < K_BYTES)
    packed = tl.load(w_blocks + rows[:, None, None] * K_BYTES + col, mask=mask, other=0).to(tl.int32)
    scol = b0 // 16 + sb[None, :]
    scale = tl.load(w_scales + rows[:, None] * (K_BYTES // 16) + scol,
                    mask=row_mask[:, None] & (scol < K_BYTES // 16), other=0).to(tl.int32)
    part = e2m1_over_16384(packed & 15) * x_even + e2m1_over_16384(packed >> 4) * x_odd
    return tl.sum(part, axis=2) * e8m0_times_16384(scale)


@triton.jit
def _load_even_odd(ptr, b0, K_BYTES: tl.constexpr, NSB: tl.constexpr):
    """Activation values at K positions 2*(b0+j) and 2*(b0+j)+1 shaped [1, NSB, 16], float32."""
    sb = tl.arange(0, NSB)
    byte = tl.arange(0, 16)
    col = b0 + sb[None, :, None] * 16 + byte[None, None, :]
    mask = col < K_BYTES
    even = tl.load(ptr + 2 * col, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(ptr + 2 * col + 1, mask=mask, other=0.0).to(tl.float32)
    return even, odd


@triton.jit
def _mlp1_swiglu_gemv_kernel(
    x_ptr, stride_x, ids_ptr, w_blocks, w_scales, bias_ptr, h_ptr,
    INTER: tl.constexpr, HIDDEN: tl.constexpr, TOPK: tl.constexpr, alpha, limit,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)  # token * TOPK + slot
    token = pair // TOPK
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < INTER
    gate_rows = expert * (2 * INTER) + 2 * offs_i
    lin_rows = gate_rows + 1
    K_BYTES: tl.constexpr = HIDDEN // 2
    NSB: tl.constexpr = BLOCK_K // 32
    acc_gate = tl.zeros((BLOCK_I, NSB), dtype=tl.float32)
    acc_lin = tl.zeros((BLOCK_I, NSB), dtype=tl.float32)
    for b0 in range(0, K_BYTES, BLOCK_K // 2):
        x_even, x_odd = _load_even_odd(x_ptr + token * stride_x, b0, K_BYTES, NSB)
        acc_gate += _mxfp4_row_dot(w_blocks, w_scales, gate_rows, mask_i, x_even, x_odd, b0, K_BYTES, NSB)
        acc_lin += _mxfp4_row_dot(w_blocks, w_scales, lin_rows, mask_i, x_even, x_odd, b0, K_BYTES, NSB)
    gate = tl.sum(acc_gate, axis=1) + tl.load(bias_ptr + gate_rows, mask=mask_i, other=0.0).to(tl.float32)
    lin = tl.sum(acc_lin, axis=1) + tl.load(bias_ptr + lin_rows, mask=mask_i, other=0.0).to(tl.float32)
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    out = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    tl.store(h_ptr + pair * INTER + offs_i, out.to(h_ptr.dtype.element_ty), mask=mask_i)


@triton.jit
def _mlp2_combine_gemv_kernel(
    h_ptr, ids_ptr, route_w_ptr, w_blocks, w_scales, bias_ptr, out_ptr, stride_out,
    HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < HIDDEN
    split = tl.program_id(2)
    K_BYTES: tl.constexpr = INTER // 2
    NSB: tl.constexpr = BLOCK_K // 32
    b_start = split * (K_PER_SPLIT // 2)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in tl.static_range(TOPK):
        pair = token * TOPK + slot
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        rows = expert * HIDDEN + offs_n
        acc = tl.zeros((BLOCK_N, NSB), dtype=tl.float32)
        for b0 in range(b_start, b_start + K_PER_SPLIT // 2, BLOCK_K // 2):
            h_even, h_odd = _load_even_odd(h_ptr + pair * INTER, b0, K_BYTES, NSB)
            acc += _mxfp4_row_dot(w_blocks, w_scales, rows, mask_n, h_even, h_odd, b0, K_BYTES, NSB)
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
) -> torch.Tensor:
    """The MoE block for a few tokens: x [T, H] -> [T, H] in x's dtype (see kernels.reference.moe)."""
    tokens, hidden = x.shape
    topk = expert_ids.shape[1]
    inter = mlp1_blocks.shape[1] // 2
    for t in (mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales, expert_ids, expert_weights):
        assert t.is_contiguous()
    assert x.stride(-1) == 1 and hidden % 32 == 0 and inter % 32 == 0
    cfg = block_config("moe_gemv", x.device)
    h = torch.empty(tokens * topk, inter, dtype=x.dtype, device=x.device)
    grid1 = (tokens * topk, triton.cdiv(inter, cfg["BLOCK_I"]))
    _mlp1_swiglu_gemv_kernel[grid1](
        x, x.stride(0), expert_ids, mlp1_blocks, mlp1_scales, mlp1_bias, h,
        INTER=inter, HIDDEN=hidden, TOPK=topk, alpha=swiglu_alpha, limit=swiglu_limit,
        BLOCK_I=cfg["BLOCK_I"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
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
        h, expert_ids, expert_weights, mlp2_blocks, mlp2_scales, mlp2_bias, out, out.stride(0),
        HIDDEN=hidden, INTER=inter, TOPK=topk, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        K_PER_SPLIT=k_per_split, SPLIT_K=split_k, num_warps=cfg["num_warps"],
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)
