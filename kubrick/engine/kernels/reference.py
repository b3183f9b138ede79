"""Plain-PyTorch references of every kernel: the oracle the tests check the Triton kernels against.

They follow openai/gpt-oss `gpt_oss/torch/model.py` and work in float32 internally, so they are also the
readable statement of what each kernel computes.
"""

from __future__ import annotations

import math

import torch

# E2M1 (fp4) codes 0..15 -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., K/32, 16] (low nibble first) and scales uint8 [..., K/32] (E8M0) -> float32 [..., K]."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    values = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., K/32, 32]
    exponent = scales.to(torch.int32) - 127
    values = torch.ldexp(values, exponent.unsqueeze(-1))
    return values.flatten(-2)


def swiglu(x: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """Interleaved swiglu of gpt-oss: even columns are the gate, odd ones the linear part."""
    gate, linear = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    t = x.float()
    t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return (t * weight.float()).to(x.dtype)


def router(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, round_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H], bias [E] -> (expert ids int32 [T, k] by falling logit, weights f32 [T, k])."""
    logits = x.float() @ weight.float().T + bias.float()
    if round_logits:
        logits = logits.to(torch.bfloat16).float()
    values, indices = torch.topk(logits, k, dim=-1, sorted=True)
    return indices.to(torch.int32), torch.softmax(values, dim=-1)


def moe(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    mlp1_blocks: torch.Tensor,
    mlp1_scales: torch.Tensor,
    mlp1_bias: torch.Tensor,
    mlp2_blocks: torch.Tensor,
    mlp2_scales: torch.Tensor,
    mlp2_bias: torch.Tensor,
) -> torch.Tensor:
    """MoE block without norm/residual: x [T, H] -> sum_j w[t,j] * (W2[e] swiglu(W1[e] x + b1[e]) + b2[e]).

    The swiglu output is rounded to x's dtype, as the checkpoint-dtype reference model does between the two
    matmuls; everything else is float32. Only the experts that are used get dequantised.
    """
    tokens, k = expert_ids.shape
    out = torch.zeros(tokens, mlp2_blocks.shape[1], dtype=torch.float32, device=x.device)
    flat = expert_ids.long().flatten()
    for e in flat.unique().tolist():
        pair = (flat == e).nonzero().flatten()
        t = pair // k
        w1 = dequant_mxfp4(mlp1_blocks[e], mlp1_scales[e])
        h = swiglu(x[t].float() @ w1.T + mlp1_bias[e].float()).to(x.dtype)
        w2 = dequant_mxfp4(mlp2_blocks[e], mlp2_scales[e])
        y = h.float() @ w2.T + mlp2_bias[e].float()
        out.index_add_(0, t, y * expert_weights.flatten()[pair].float().unsqueeze(-1))
    return out.to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    q_positions: torch.Tensor,
    kv_len: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal GQA attention with learned sinks for one sequence.

    q [T, QH, D] at positions q_positions [T]; k, v [S, KVH, D] (a cache: keys 0..kv_len-1 are valid);
    sinks [QH] join the softmax denominator only; window > 0 means a query at p sees keys in (p-window, p].
    """
    n_tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    keys = k[:kv_len].float().repeat_interleave(q_heads // kv_heads, dim=1)  # [S, QH, D]
    values = v[:kv_len].float().repeat_interleave(q_heads // kv_heads, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), keys) * scale  # [QH, T, S]
    key_pos = torch.arange(kv_len, device=q.device)
    visible = key_pos[None, :] <= q_positions[:, None]
    if window > 0:
        visible &= key_pos[None, :] > q_positions[:, None] - window
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.float().view(q_heads, 1, 1).expand(q_heads, n_tokens, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return torch.einsum("hts,shd->thd", probs, values).to(q.dtype)


def rope_and_cache(qkv, cos, sin, positions, k_cache, v_cache, q_heads: int, kv_heads: int) -> torch.Tensor:
    """Split qkv, rotate q and k (NeoX halves, float32 math), write k and v into the caches at `positions`."""
    n = qkv.shape[0]
    head_dim = qkv.shape[1] // (q_heads + 2 * kv_heads)
    q, k, v = torch.split(qkv, [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)

    def rotate(x, heads):
        x1, x2 = torch.chunk(x.reshape(n, heads, head_dim).float(), 2, dim=-1)
        c, s = cos[:, None, :].float(), sin[:, None, :].float()
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)

    k_cache[positions] = rotate(k, kv_heads).to(k_cache.dtype)
    v_cache[positions] = v.reshape(n, kv_heads, head_dim).to(v_cache.dtype)
    return rotate(q, q_heads)


def group_by_expert(expert_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs sorted by expert, each expert's run padded to whole tiles of block_m.

    expert_ids [T, k] -> (pair ids [tiles * block_m]: pair token * k + slot, -1 = padding; tile expert
    [tiles]: -1 = none), tiles = cdiv(T * k, block_m) + n_experts (the worst case), both int32; within an
    expert, pairs keep their order (a stable sort).
    """
    flat = expert_ids.flatten().long()
    tiles = -(-flat.numel() // block_m) + n_experts
    pair_ids = torch.full((tiles * block_m,), -1, dtype=torch.int32)
    tile_expert = torch.full((tiles,), -1, dtype=torch.int32)
    tile = 0
    for expert in range(n_experts):
        members = (flat == expert).nonzero().flatten()
        for first in range(0, len(members), block_m):
            run = members[first : first + block_m]
            pair_ids[tile * block_m : tile * block_m + len(run)] = run.to(torch.int32)
            tile_expert[tile] = expert
            tile += 1
    return pair_ids.to(expert_ids.device), tile_expert.to(expert_ids.device)
