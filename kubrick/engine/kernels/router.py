"""Router: logits = x W^T + b, top-k by falling logit, softmax over the k chosen logits.

Two kernels, because one program per token leaves a batch-1 step on a single SM reading all of W:
  logits: grid (token, K split): partial logits of every expert over one slice of the hidden size;
  top-k:  one program per token sums the partials and the bias, then takes k rounds of (max, lowest index
          holding it, knock it out), so ties go to the lower expert id, and softmaxes the k values.
Logits stay in float32, or are rounded to bf16 first (round_logits=True) to pick exactly what a model whose
router matmul outputs bf16 picks (the reference model does; ties within one bf16 step are common).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import num_sms, round_to_bf16


@triton.jit
def _router_logits_kernel(
    x_ptr, w_ptr, partial_ptr, stride_x, n_experts, hidden,
    K_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    valid_e = experts < n_experts
    acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
    for k0 in range(split * K_PER_SPLIT, (split + 1) * K_PER_SPLIT, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        valid_k = cols < hidden
        x = tl.load(x_ptr + token * stride_x + cols, mask=valid_k, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + experts[:, None] * hidden + cols[None, :], mask=valid_e[:, None] & valid_k[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(partial_ptr + (token * SPLITS + split) * BLOCK_E + experts, tl.sum(acc, axis=1))


@triton.jit
def _topk_softmax_kernel(
    partial_ptr, b_ptr, ids_ptr, weights_ptr, n_experts,
    TOPK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid_e = experts < n_experts
    splits = tl.arange(0, SPLITS)
    partial = tl.load(partial_ptr + (token * SPLITS + splits[:, None]) * BLOCK_E + experts[None, :])
    logits = tl.sum(partial, axis=0) + tl.load(b_ptr + experts, mask=valid_e, other=0.0).to(tl.float32)
    if ROUND_BF16:
        logits = round_to_bf16(logits)
    logits = tl.where(valid_e, logits, float("-inf"))

    slots = tl.arange(0, BLOCK_TOPK)
    top_values = tl.full((BLOCK_TOPK,), float("-inf"), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_TOPK,), dtype=tl.int32)
    for j in tl.static_range(TOPK):
        best = tl.max(logits, axis=0)
        best_id = tl.min(tl.where(logits == best, experts, BLOCK_E), axis=0)
        top_values = tl.where(slots == j, best, top_values)
        top_ids = tl.where(slots == j, best_id, top_ids)
        logits = tl.where(experts == best_id, float("-inf"), logits)
    # top_values[0] is the largest: subtract it so exp never overflows; empty slots give exp(-inf) = 0.
    p = tl.exp(top_values - tl.max(top_values, axis=0))
    p = p / tl.sum(p, axis=0)
    keep = slots < TOPK
    tl.store(ids_ptr + token * TOPK + slots, top_ids, mask=keep)
    tl.store(weights_ptr + token * TOPK + slots, p, mask=keep)


def router(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, round_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] (contiguous), bias [E] -> (expert ids int32 [T, k], routing weights float32 [T, k])."""
    tokens, hidden = x.shape
    n_experts = weight.shape[0]
    assert weight.is_contiguous() and x.stride(-1) == 1
    block_e = triton.next_power_of_2(n_experts)
    block_k = max(16, min(triton.next_power_of_2(hidden), 4096 // block_e))
    splits = 1  # enough programs to spread W over the SMs, each at least one K step
    while tokens * splits < num_sms(x.device) and hidden >= splits * 2 * block_k:
        splits *= 2
    k_per_split = triton.cdiv(triton.cdiv(hidden, splits), block_k) * block_k
    partial = torch.empty(tokens, splits, block_e, dtype=torch.float32, device=x.device)
    _router_logits_kernel[(tokens, splits)](
        x, weight, partial, x.stride(0), n_experts, hidden,
        K_PER_SPLIT=k_per_split, SPLITS=splits, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=4,
    )
    ids = torch.empty(tokens, k, dtype=torch.int32, device=x.device)
    weights = torch.empty(tokens, k, dtype=torch.float32, device=x.device)
    _topk_softmax_kernel[(tokens,)](
        partial, bias, ids, weights, n_experts,
        TOPK=k, SPLITS=splits, BLOCK_E=block_e, BLOCK_TOPK=max(2, triton.next_power_of_2(k)), ROUND_BF16=round_logits,
        num_warps=1,
    )
    return ids, weights
