"""QKV split + YaRN rotary embedding + KV-cache write, fused: one launch instead of ~18 small torch ops.

One program per (token, block of heads) of the fused QKV projection output: query heads are rotated into a
new q tensor, key heads are rotated and written into the cache row of the token's position, value heads are
copied there. NeoX-style rotation (the two halves of a head rotate together) in float32; cos and sin come
from the caller (the reference model's RotaryEmbedding.cos_sin, YaRN scaling and concentration included).
Positions are read from a device tensor, so a captured CUDA graph can replay with new positions.

For one token (batch-1 decode) `qkv_rope_cache` does all of this in the QKV GEMV's epilogue: one launch fewer
a layer. The GEMV's programs own a few adjacent rows of W, so the model stores each head's rows interleaved
(`interleave_rope_rows`: row 2i is the head's dimension i, row 2i + 1 its dimension i + D/2), and every pair
that rotates together ends in one program; the unfused path reads that layout with interleaved=True.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from kubrick.engine.kernels._common import block_config, pdl, pdl_start, round_to
from kubrick.engine.kernels.linear import gemv_rows, linear, uses_gemv

# One (token, head) a program moved 128 bytes in and out: a 2048-token prompt launched 164k programs and took
# ~200 us a layer on the H100 (7 % of copy bandwidth, 8 % of a prefill). From HEADS_FROM tokens on, a program
# takes HEADS_PER_PROGRAM heads of one token.
HEADS_FROM = 16
HEADS_PER_PROGRAM = 16


@triton.jit
def _rotate_and_store(a, b, head, d, row, cos, sin, q_row_ptr, k_ptr, v_ptr, stride_q_h, stride_k_s, stride_k_h,
                      stride_v_s, stride_v_h, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                      mask):
    """Dimensions d and d + HALF (a, b: float32) of heads `head` (query, then key, then value heads): queries
    rotated into q's row, keys rotated and values as they are into cache row `row`."""
    rotated = head < Q_HEADS + KV_HEADS  # values are copied as they are
    r1 = tl.where(rotated, a * cos - b * sin, a)
    r2 = tl.where(rotated, b * cos + a * sin, b)
    kv = head - Q_HEADS
    dst = tl.where(head < Q_HEADS, q_row_ptr + head * stride_q_h,
                   tl.where(kv < KV_HEADS, k_ptr + row * stride_k_s + kv * stride_k_h,
                            v_ptr + row * stride_v_s + (kv - KV_HEADS) * stride_v_h)) + d
    tl.store(dst, r1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, r2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
    stride_qkv, stride_cs, stride_q_t, stride_q_h, stride_k_s, stride_k_h, stride_v_s, stride_v_h,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # query heads, then key heads, then value heads
    d = tl.arange(0, HALF)
    real = (head < Q_HEADS + 2 * KV_HEADS)[:, None]
    head_ptr = qkv_ptr + token * stride_qkv + head[:, None] * (2 * HALF)
    if INTERLEAVED:  # dimension i at 2i, i + HALF at 2i + 1 (interleave_rope_rows)
        x1 = tl.load(head_ptr + 2 * d[None, :], mask=real, other=0.0)
        x2 = tl.load(head_ptr + 2 * d[None, :] + 1, mask=real, other=0.0)
    else:
        x1 = tl.load(head_ptr + d[None, :], mask=real, other=0.0)
        x2 = tl.load(head_ptr + HALF + d[None, :], mask=real, other=0.0)
    row = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + token * stride_cs + d).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_cs + d).to(tl.float32)[None, :]
    _rotate_and_store(x1.to(tl.float32), x2.to(tl.float32), head[:, None], d[None, :], row, cos, sin,
                      q_ptr + token * stride_q_t, k_ptr, v_ptr, stride_q_h, stride_k_s, stride_k_h, stride_v_s,
                      stride_v_h, Q_HEADS, KV_HEADS, HALF, real)


@triton.jit
def _qkv_rope_cache_kernel(
    x_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
    stride_q_h, stride_k_s, stride_k_h, stride_v_s, stride_v_h,
    N: tl.constexpr, K: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AHEAD: tl.constexpr, PDL: tl.constexpr,
):
    """One token: qkv = x W^T + b over BLOCK_N interleaved rows (BLOCK_N / 2 rotation pairs), rounded as
    F.linear rounds, then rotated and stored as _rope_cache_kernel does.

    Under PDL the attention after it may launch only once a program has stored its rows: launched at the
    programs' start (as the other kernels let theirs), it made the batch-1 step 3 % slower than with the RoPE
    kernel between them, and at the end 1 % faster (BENCHMARKS.md run 46)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    mask_n = offs_n < N
    y = gemv_rows(x_ptr, w_ptr, offs_n, mask_n, K, BLOCK_K, MASK_N, AHEAD, PDL, LAUNCH_AT_END=True)
    y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = round_to(y, q_ptr.dtype.element_ty)  # the projection's output dtype, as rope_and_cache reads it
    a, b = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))  # (dimension i, dimension i + HALF) of each pair
    pair = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    head, d = pair // HALF, pair % HALF
    row = tl.load(pos_ptr).to(tl.int64)
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.load(sin_ptr + d).to(tl.float32)
    _rotate_and_store(a, b, head, d, row, cos, sin, q_ptr, k_ptr, v_ptr, stride_q_h, stride_k_s, stride_k_h,
                      stride_v_s, stride_v_h, Q_HEADS, KV_HEADS, HALF, 2 * pair < N)
    if PDL:
        gdc_launch_dependents()


def interleave_rope_rows(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The QKV projection's weight [heads * D, K] or bias [heads * D] with each head's rows reordered so that
    row 2i holds dimension i and row 2i + 1 dimension i + D/2 (the pair RoPE rotates together)."""
    heads = t.shape[0] // head_dim
    halves = t.reshape(heads, 2, head_dim // 2, *t.shape[1:])
    return halves.transpose(1, 2).reshape(t.shape).contiguous()


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
    interleaved: bool = False,
) -> torch.Tensor:
    """qkv [n, (QH + 2 KVH) * D] -> rotated q [n, QH, D]; rotated k and v land in k_cache/v_cache [S, KVH, D]
    at rows `positions` [n] (int tensor on qkv's device). cos, sin: [n, D/2] float32. out: q's buffer.
    heads_per_program (a power of two): default one for a few tokens (more programs to spread over the SMs),
    HEADS_PER_PROGRAM from HEADS_FROM tokens on. interleaved: qkv's heads in interleave_rope_rows' order."""
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
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=half, BLOCK_H=block_h, INTERLEAVED=interleaved,
        **pdl(qkv.device), num_warps=1 if block_h < 8 else 4,
    )
    return q


def qkv_rope_cache(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_heads: int, kv_heads: int,
                   out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """rope_and_cache(linear(x, weight, bias), ..., interleaved=True) for weight and bias in interleave_rope_rows'
    order: x [n, K] -> q [n, QH, D], keys and values into the caches. One token: one launch (the GEMV with the
    rotation as its epilogue); more: F.linear, then rope_and_cache. config: linear_gemv's table entries."""
    n, k = x.shape
    rows = weight.shape[0]
    head_dim = rows // (q_heads + 2 * kv_heads)
    cfg = block_config("linear_gemv", x.device) | (config or {})
    if not uses_gemv(x, weight) or cfg["BLOCK_N"] % 2:
        return rope_and_cache(linear(x, weight, bias), cos, sin, positions, k_cache, v_cache, q_heads, kv_heads,
                              out=out, interleaved=True)
    assert bias.is_contiguous() and cos.stride(1) == 1 and sin.stride() == cos.stride()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and k_cache.dtype == v_cache.dtype == x.dtype
    q = torch.empty(1, q_heads, head_dim, dtype=x.dtype, device=x.device) if out is None else out
    assert q.shape == (1, q_heads, head_dim) and q.dtype == x.dtype and q.stride(2) == 1
    _qkv_rope_cache_kernel[(triton.cdiv(rows, cfg["BLOCK_N"]),)](
        x, weight, bias, cos, sin, positions, q, k_cache, v_cache,
        q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        N=rows, K=k, Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=head_dim // 2, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], AHEAD=bool(cfg.get("AHEAD", True)), **pdl(x.device), num_warps=cfg["num_warps"],
    )
    return q
