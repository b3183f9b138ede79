"""QKV split + YaRN rotary embedding + KV-cache write, fused: one launch instead of ~18 small torch ops.

One program per (token, head) of the fused QKV projection output: query heads are rotated into a new q
tensor, key heads are rotated and written into the cache row of the token's position, value heads are
copied there. NeoX-style rotation (the two halves of a head rotate together) in float32; cos and sin come
from the caller (the reference model's RotaryEmbedding.cos_sin, YaRN scaling and concentration included).
Positions are read from a device tensor, so a captured CUDA graph can replay with new positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import pdl, pdl_start


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
    stride_qkv, stride_cs, stride_q_t, stride_q_h, stride_k_s, stride_k_h, stride_v_s, stride_v_h,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HALF)
    src = qkv_ptr + token * stride_qkv + head * (2 * HALF)
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    row = tl.load(pos_ptr + token).to(tl.int64)
    if head < Q_HEADS + KV_HEADS:
        cos = tl.load(cos_ptr + token * stride_cs + d).to(tl.float32)
        sin = tl.load(sin_ptr + token * stride_cs + d).to(tl.float32)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        r1 = a * cos - b * sin
        r2 = b * cos + a * sin
        if head < Q_HEADS:
            dst = q_ptr + token * stride_q_t + head * stride_q_h
        else:
            dst = k_ptr + row * stride_k_s + (head - Q_HEADS) * stride_k_h
        tl.store(dst + d, r1.to(dst.dtype.element_ty))
        tl.store(dst + HALF + d, r2.to(dst.dtype.element_ty))
    else:
        dst = v_ptr + row * stride_v_s + (head - Q_HEADS - KV_HEADS) * stride_v_h
        tl.store(dst + d, x1.to(dst.dtype.element_ty))
        tl.store(dst + HALF + d, x2.to(dst.dtype.element_ty))


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv [n, (QH + 2 KVH) * D] -> rotated q [n, QH, D]; rotated k and v land in k_cache/v_cache [S, KVH, D]
    at rows `positions` [n] (int tensor on qkv's device). cos, sin: [n, D/2] float32. out: q's buffer."""
    n = qkv.shape[0]
    head_dim = qkv.shape[1] // (q_heads + 2 * kv_heads)
    half = head_dim // 2
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and half == triton.next_power_of_2(half)
    assert k_cache.dtype == v_cache.dtype == qkv.dtype  # one kernel writes q and the caches through one pointer type
    q = torch.empty(n, q_heads, head_dim, dtype=qkv.dtype, device=qkv.device) if out is None else out
    assert q.shape == (n, q_heads, head_dim) and q.dtype == qkv.dtype and q.stride(2) == 1
    _rope_cache_kernel[(n, q_heads + 2 * kv_heads)](
        qkv, cos, sin, positions, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=half, **pdl(qkv.device), num_warps=1,
    )
    return q
