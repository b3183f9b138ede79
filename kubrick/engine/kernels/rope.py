"""QKV split + YaRN rotary embedding + KV-cache write, fused: one launch instead of ~18 small torch ops.

One program per (token, block of heads) of the fused QKV projection output: query heads are rotated into a
new q tensor, key heads are rotated and written into the cache row of the token's position, value heads are
copied there. NeoX-style rotation (the two halves of a head rotate together) in float32; cos and sin come
from the caller (the reference model's RotaryEmbedding.cos_sin, YaRN scaling and concentration included).
Positions are read from a device tensor, so a captured CUDA graph can replay with new positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import pdl, pdl_start

# One (token, head) a program moved 128 bytes in and out: a 2048-token prompt launched 164k programs and took
# ~200 us a layer on the H100 (7 % of copy bandwidth, 8 % of a prefill). From HEADS_FROM tokens on, a program
# takes HEADS_PER_PROGRAM heads of one token.
HEADS_FROM = 16
HEADS_PER_PROGRAM = 16


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
    stride_qkv, stride_cs, stride_q_t, stride_q_h, stride_k_s, stride_k_h, stride_v_s, stride_v_h,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # query heads, then key heads, then value heads
    d = tl.arange(0, HALF)
    real = (head < Q_HEADS + 2 * KV_HEADS)[:, None]
    src = qkv_ptr + token * stride_qkv + head[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(src, mask=real, other=0.0)
    x2 = tl.load(src + HALF, mask=real, other=0.0)
    row = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + token * stride_cs + d).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_cs + d).to(tl.float32)[None, :]
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    rotated = (head < Q_HEADS + KV_HEADS)[:, None]  # values are copied as they are
    r1 = tl.where(rotated, a * cos - b * sin, a)
    r2 = tl.where(rotated, b * cos + a * sin, b)
    kv = head - Q_HEADS
    dst = tl.where(head < Q_HEADS, q_ptr + token * stride_q_t + head * stride_q_h,
                   tl.where(kv < KV_HEADS, k_ptr + row * stride_k_s + kv * stride_k_h,
                            v_ptr + row * stride_v_s + (kv - KV_HEADS) * stride_v_h))[:, None] + d[None, :]
    tl.store(dst, r1.to(dst.dtype.element_ty), mask=real)
    tl.store(dst + HALF, r2.to(dst.dtype.element_ty), mask=real)


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
    heads_per_program: int | None = None,
) -> torch.Tensor:
    """qkv [n, (QH + 2 KVH) * D] -> rotated q [n, QH, D]; rotated k and v land in k_cache/v_cache [S, KVH, D]
    at rows `positions` [n] (int tensor on qkv's device). cos, sin: [n, D/2] float32. out: q's buffer.
    heads_per_program (a power of two): default one for a few tokens (more programs to spread over the SMs),
    HEADS_PER_PROGRAM from HEADS_FROM tokens on."""
    n = qkv.shape[0]
    head_dim = qkv.shape[1] // (q_heads + 2 * kv_heads)
    half = head_dim // 2
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and half == triton.next_power_of_2(half)
    assert k_cache.dtype == v_cache.dtype == qkv.dtype  # one kernel writes q and the caches through one pointer type
    q = torch.empty(n, q_heads, head_dim, dtype=qkv.dtype, device=qkv.device) if out is None else out
    assert q.shape == (n, q_heads, head_dim) and q.dtype == qkv.dtype and q.stride(2) == 1
    block_h = heads_per_program or (1 if n < HEADS_FROM else HEADS_PER_PROGRAM)
    assert block_h == triton.next_power_of_2(block_h)
    _rope_cache_kernel[(n, triton.cdiv(q_heads + 2 * kv_heads, block_h))](
        qkv, cos, sin, positions, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=half, BLOCK_H=block_h, **pdl(qkv.device),
        num_warps=1 if block_h < 8 else 4,
    )
    return q
