"""Router: logits = x W^T + b, top-k by falling logit, softmax over the k chosen logits; optionally with the
RMSNorm before it (and the residual add before that) in the same launch.

One kernel, grid (token, K split). Each program takes the partial logits of every expert over one slice of the
hidden size (one program per token leaves a batch-1 step on a single SM reading all of W). With one split it
goes on to the top-k itself; with several, the last program of a token to arrive (_common.last_to_arrive) sums
the partials and the bias, takes k rounds of (max, lowest index holding it, knock it out), so ties go to the
lower expert id, and softmaxes the k values.
Logits stay in float32, or are rounded to bf16 first (round_logits=True) to pick exactly what a model whose
router matmul outputs bf16 picks (the reference model does; ties within one bf16 step are common).

`norm_router` is the MoE block's whole input side at decode: h = x + y (the attention's out-projection added as
the model adds), h written to the float32 stream, t = RMSNorm(h) * w written in the model's dtype (and in the
MoE GEMV's input layout), and t routed. Every program computes the row's statistics itself (a row is a few
thousand values) and normalises only its slice, so the three launches of norm, logits and top-k become one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import (arrival_counters, last_to_arrive, num_sms, pdl, pdl_start, round_to,
                                           round_to_bf16)
from kubrick.engine.kernels.moe_gemv import _TL_DTYPE, GemvInput, store_gemv_input
from kubrick.engine.kernels.rmsnorm import residual_sum


@triton.jit
def _top_k_softmax(logits, experts, valid_e, b_ptr, ids_ptr, weights_ptr, token,
                   TOPK: tl.constexpr, BLOCK_TOPK: tl.constexpr, ROUND_BF16: tl.constexpr):
    logits += tl.load(b_ptr + experts, mask=valid_e, other=0.0).to(tl.float32)
    if ROUND_BF16:
        logits = round_to_bf16(logits)
    logits = tl.where(valid_e, logits, float("-inf"))
    slots = tl.arange(0, BLOCK_TOPK)
    top_values = tl.full((BLOCK_TOPK,), float("-inf"), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_TOPK,), dtype=tl.int32)
    for j in tl.static_range(TOPK):
        best = tl.max(logits, axis=0)
        best_id = tl.min(tl.where(logits == best, experts, experts.shape[0]), axis=0)
        top_values = tl.where(slots == j, best, top_values)
        top_ids = tl.where(slots == j, best_id, top_ids)
        logits = tl.where(experts == best_id, float("-inf"), logits)
    # top_values[0] is the largest: subtract it so exp never overflows; empty slots give exp(-inf) = 0.
    p = tl.exp(top_values - tl.max(top_values, axis=0))
    p = p / tl.sum(p, axis=0)
    keep = slots < TOPK
    tl.store(ids_ptr + token * TOPK + slots, top_ids, mask=keep)
    tl.store(weights_ptr + token * TOPK + slots, p, mask=keep)


@triton.jit
def _router_input(x_ptr, y_ptr, norm_w_ptr, t_ptr, stream_ptr, gemv_ptr, gemv_mult_ptr, token, stride_x, stride_y,
                  hidden, inv_rms, t_max, first, cols, valid_k, NORM: tl.constexpr, ADD: tl.constexpr,
                  STREAM: tl.constexpr, GEMV: tl.constexpr, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """Columns `cols` of what the router reads (float32): x itself, or the norm's output, which is then also
    written everywhere it is wanted (t, and h to the stream, t in the GEMV layout)."""
    if NORM:
        h = residual_sum(x_ptr, y_ptr, token, stride_x, stride_y, cols, valid_k, ADD, DTYPE)
        t = round_to(h * inv_rms * tl.load(norm_w_ptr + cols, mask=valid_k, other=0.0).to(tl.float32), DTYPE)
        tl.store(t_ptr + token * hidden + cols, t.to(DTYPE), mask=valid_k)
        if STREAM:
            tl.store(stream_ptr + token * hidden + cols, h, mask=valid_k)
        if GEMV:  # t_max: the row's largest |t| (for the half layout); `first`: the program that writes its factor
            store_gemv_input(gemv_ptr, gemv_mult_ptr, token, cols, t, hidden, valid_k, t_max, first, HALF)
    else:
        t = tl.load(x_ptr + token * stride_x + cols, mask=valid_k, other=0.0).to(tl.float32)
    return t


@triton.jit
def _router_kernel(
    x_ptr, y_ptr, norm_w_ptr, t_ptr, stream_ptr, gemv_ptr, gemv_mult_ptr, w_ptr, b_ptr, partial_ptr, counter_ptr,
    ids_ptr, weights_ptr, stride_x, stride_y, n_experts, hidden, eps,
    K_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, TOPK: tl.constexpr, BLOCK_TOPK: tl.constexpr, ROUND_BF16: tl.constexpr,
    NORM: tl.constexpr, ADD: tl.constexpr, STREAM: tl.constexpr, GEMV: tl.constexpr, HALF: tl.constexpr,
    DTYPE: tl.constexpr, PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    valid_e = experts < n_experts
    ONE_STEP: tl.constexpr = K_PER_SPLIT == BLOCK_K
    if ONE_STEP:  # W's slice is loaded first (under PDL before waiting for the kernel before): its latency
        cols = split * BLOCK_K + tl.arange(0, BLOCK_K)  # overlaps that kernel's tail and the row's statistics
        valid_k = cols < hidden
        w_slice = tl.load(w_ptr + experts[:, None] * hidden + cols[None, :],
                          mask=valid_e[:, None] & valid_k[None, :], other=0.0)
    pdl_start(PDL)
    inv_rms = 1.0
    t_max = 0.0
    if NORM:  # the row's statistics, as kernels/rmsnorm.py computes them
        row = tl.arange(0, BLOCK_H)
        if HALF:  # the half layout's factor needs the whole row's largest |t|, so all of the norm's weights
            norm_w = tl.load(norm_w_ptr + row, mask=row < hidden, other=0.0).to(tl.float32)
        whole = residual_sum(x_ptr, y_ptr, token, stride_x, stride_y, row, row < hidden, ADD, DTYPE)
        inv_rms = tl.rsqrt(tl.sum(whole * whole, axis=0) / hidden + eps)
        if HALF:
            t_max = tl.max(tl.abs(round_to(whole * inv_rms * norm_w, DTYPE)), axis=0)
    if ONE_STEP:
        t = _router_input(x_ptr, y_ptr, norm_w_ptr, t_ptr, stream_ptr, gemv_ptr, gemv_mult_ptr, token, stride_x,
                          stride_y, hidden, inv_rms, t_max, split == 0, cols, valid_k, NORM, ADD, STREAM, GEMV, HALF,
                          DTYPE)
        logits = tl.sum(w_slice.to(tl.float32) * t[None, :], axis=1)
    else:
        acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
        for k0 in range(split * K_PER_SPLIT, (split + 1) * K_PER_SPLIT, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            valid_k = cols < hidden
            t = _router_input(x_ptr, y_ptr, norm_w_ptr, t_ptr, stream_ptr, gemv_ptr, gemv_mult_ptr, token, stride_x,
                              stride_y, hidden, inv_rms, t_max, split == 0, cols, valid_k, NORM, ADD, STREAM, GEMV,
                              HALF, DTYPE)
            w = tl.load(w_ptr + experts[:, None] * hidden + cols[None, :],
                        mask=valid_e[:, None] & valid_k[None, :], other=0.0)
            acc += w.to(tl.float32) * t[None, :]
        logits = tl.sum(acc, axis=1)
    if SPLITS == 1:
        _top_k_softmax(logits, experts, valid_e, b_ptr, ids_ptr, weights_ptr, token, TOPK, BLOCK_TOPK, ROUND_BF16)
    else:
        tl.store(partial_ptr + (token * SPLITS + split) * BLOCK_E + experts, logits)
        if last_to_arrive(counter_ptr + token, SPLITS):
            splits = tl.arange(0, SPLITS)
            partial = tl.load(partial_ptr + (token * SPLITS + splits[:, None]) * BLOCK_E + experts[None, :],
                              cache_modifier=".cg")
            _top_k_softmax(tl.sum(partial, axis=0), experts, valid_e, b_ptr, ids_ptr, weights_ptr, token, TOPK,
                           BLOCK_TOPK, ROUND_BF16)


def default_splits(tokens: int, hidden: int, block_k: int, sms: int) -> int:
    """Programs a row: enough to spread W over the SMs, each at least one K step."""
    splits = 1
    while tokens * splits < sms and hidden >= splits * 2 * block_k:
        splits *= 2
    return splits


def _route(x, y, norm_weight, eps, weight, bias, k, round_logits, t, stream, gemv_out, splits=None):
    tokens, hidden = x.shape
    n_experts = weight.shape[0]
    assert weight.is_contiguous() and x.stride(-1) == 1
    block_e = triton.next_power_of_2(n_experts)
    block_k = max(16, min(triton.next_power_of_2(hidden), 4096 // block_e))
    if splits is None:
        splits = default_splits(tokens, hidden, block_k, num_sms(x.device))
    if stream is not None and splits > 1:  # each program reads the whole row of x while others write stream
        assert stream.data_ptr() != x.data_ptr(), "the stream may not be x itself when the row is split"
    k_per_split = triton.cdiv(triton.cdiv(hidden, splits), block_k) * block_k
    if splits > 1 and k_per_split <= 2 * block_k:  # a split in one step (ONE_STEP in the kernel)
        block_k = k_per_split
    partial = torch.empty(tokens, splits, block_e, dtype=torch.float32, device=x.device)
    counters = arrival_counters(x.device, tokens) if splits > 1 else partial
    ids = torch.empty(tokens, k, dtype=torch.int32, device=x.device)
    weights = torch.empty(tokens, k, dtype=torch.float32, device=x.device)
    norm = norm_weight is not None
    _router_kernel[(tokens, splits)](
        x, y if y is not None else x, norm_weight if norm else x, t if norm else x,
        stream if stream is not None else x, gemv_out.data if gemv_out is not None else x,
        gemv_out.mult if gemv_out is not None and gemv_out.half else x, weight, bias, partial,
        counters, ids, weights, x.stride(0), y.stride(0) if y is not None else 0, n_experts, hidden, eps,
        K_PER_SPLIT=k_per_split, SPLITS=splits, BLOCK_E=block_e, BLOCK_K=block_k,
        BLOCK_H=triton.next_power_of_2(hidden), TOPK=k, BLOCK_TOPK=max(2, triton.next_power_of_2(k)),
        ROUND_BF16=round_logits, NORM=norm, ADD=y is not None, STREAM=stream is not None, GEMV=gemv_out is not None,
        HALF=gemv_out is not None and gemv_out.half, DTYPE=_TL_DTYPE[t.dtype if norm else x.dtype], **pdl(x.device),
        num_warps=4,
    )
    return ids, weights


def router(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, round_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] (contiguous), bias [E] -> (expert ids int32 [T, k], routing weights float32 [T, k])."""
    return _route(x, None, None, 0.0, weight, bias, k, round_logits, None, None, None)


def norm_router(
    x: torch.Tensor, y: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor, k: int, dtype: torch.dtype | None = None, stream: torch.Tensor | None = None,
    gemv_out: GemvInput | None = None, round_logits: bool = False, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t = RMSNorm(h) * norm_weight, routed -> (t [T, H], expert ids, routing weights), in one launch.

    h = x + y summed as `dtype` sums (default y's dtype, or x's without y; x, if float32 and dtype narrower, is
    the float32 stream and is rounded to dtype first), as rmsnorm.add_rmsnorm computes it. stream: a float32
    [T, H] buffer (not x itself) that receives h. gemv_out: a GemvInput for T rows of H (moe_gemv.new_gemv_input)
    that also receives t in moe_gemv's input layout. splits: programs a row (default: default_splits).
    """
    tokens, hidden = x.shape
    dtype = dtype or (y.dtype if y is not None else x.dtype)
    t = torch.empty(tokens, hidden, dtype=dtype, device=x.device)
    if y is not None:
        assert y.shape == x.shape and y.stride(-1) == 1
    if stream is not None:
        assert stream.dtype == torch.float32 and stream.is_contiguous() and stream.shape == x.shape
    if gemv_out is not None:
        assert gemv_out.data.is_contiguous() and gemv_out.data.shape[0] == tokens
        assert gemv_out.data.numel() * gemv_out.data.element_size() == x.numel() * (2 if gemv_out.half else 4)
    ids, weights = _route(x, y, norm_weight, eps, weight, bias, k, round_logits, t, stream, gemv_out, splits)
    return t, ids, weights

