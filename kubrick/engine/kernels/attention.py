"""Attention with learned sinks and an optional sliding window, reading the KV cache in place.

Layouts (any strides, last dim contiguous): q [B, T, QH, D]; cache k, v [B, S, KVH, D]; GQA: query head h
reads KV head h // (QH // KVH). A sink is one extra logit per query head that joins the softmax denominator
and adds nothing to the output; starting the online softmax at (max = sink, sum = 1) does exactly that.
Window w > 0: a query at position p sees keys in (p - w, p]; w = 0: full causal.

prefill: flash-style, one program per BLOCK_M queries of one head; it visits only the key blocks its causal
         window can see (O(T * w) on sliding layers). Its varlen form takes the prompt chunks of many
         sequences, packed row after row as a batched step holds them, in one launch: a small tile list on the
         device says which sequence, rows and positions each program takes.
decode:  one new query per sequence at position kv_len - 1. One program per (sequence, KV head, split): the
         QH/KVH query heads of a group form the rows of one tl.dot, so the group's keys are read once; the
         key range is cut into SPLITS pieces to fill the GPU, and the pieces' (max, sum, weighted values) are
         merged together with the sink: by the group's last split to finish (_common.last_to_arrive) when
         they are few (MERGE_SPLITS), else by a second small kernel. kv_lens live on the device (CUDA-graph safe).
Scores run in the exp2 domain (log2(e) folded into the scale).

Paged caches (block_table given): k, v are [blocks, PAGE, KVH, D] pools and block_table int32 [B, max_blocks]
maps sequence b's logical block j (positions j*PAGE …) to a pool block; the kernels look each key's row up
in the table as they go, so nothing is gathered or copied (`_kv_rows`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import (arrival_counters, block_config, interpreting, last_to_arrive, num_sms, pdl,
                                           pdl_start)

LOG2E = 1.4426950408889634
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # (the same, for the kernels)
MERGE_SPLITS = 4  # up to this many splits the decode's last split merges them (no combine launch)


def _dot_args(dtype: torch.dtype) -> dict:
    """tl.dot operand dtype and precision: float32 dots run in IEEE fp32, not TF32, so fp32 stays fp32-exact."""
    # The CPU interpreter computes bf16 tl.dot wrong (FACTS.md): it gets float32 operands instead.
    if interpreting() or dtype == torch.float32:
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    return dict(DOT_DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16, DOT_PRECISION=None)


@triton.jit
def _sink_logit(sinks_ptr, heads, mask):
    """The heads' sink logits in the exp2 domain the kernels' scores run in (times log2(e)); 0 where not mask."""
    return tl.load(sinks_ptr + heads, mask=mask, other=0.0).to(tl.float32) * _LOG2E


@triton.jit
def _kv_rows(table_ptr, batch, offs_n, mask_n, st_b, PAGE: tl.constexpr):
    """The cache row of each key position: the position itself (PAGE 0: one contiguous cache per sequence),
    or pool block * PAGE + offset through the sequence's block table."""
    if PAGE == 0:
        return offs_n.to(tl.int64)
    page = tl.load(table_ptr + batch * st_b + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
    return page * PAGE + offs_n % PAGE


# Prompt chunks of any length at any position, and any table row, must not each compile a variant of their own
# (Triton specialises integers on divisibility by 16, pointers on alignment): a compile stalls every stream.
@triton.jit(do_not_specialize=["n_tokens", "start_pos", "st_b"], do_not_specialize_on_alignment=["table_ptr"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, sinks_ptr, o_ptr, table_ptr, tiles_ptr,
    sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_t, so_h, st_b,
    n_tokens, start_pos, qk_scale,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, PDL: tl.constexpr,
):
    """A BLOCK_M-query tile of one head against the keys it sees. Plain: tile pid_m of a [B, T] chunk at
    start_pos. VARLEN: tile pid_m of tiles_ptr's list, int32 (sequence, first row of q, rows, position of
    that row) each, rows of q [rows, QH, D] packed from many sequences' chunks; an entry whose sequence is -1
    names no tile (its programs return at once)."""
    pdl_start(PDL)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    if VARLEN:
        batch = tl.load(tiles_ptr + 4 * pid_m).to(tl.int64)
        if batch < 0:
            return
        row0 = tl.load(tiles_ptr + 4 * pid_m + 1)
        n_tokens = tl.load(tiles_ptr + 4 * pid_m + 2)
        start_pos = tl.load(tiles_ptr + 4 * pid_m + 3)
        head = bh
        # This tile's queries as rows 0.. of a chunk starting at start_pos, and of q and o from row0.
        q_ptr += row0.to(tl.int64) * sq_t
        o_ptr += row0.to(tl.int64) * so_t
        sq_b = 0
        so_b = 0
        pid_m = 0
    else:
        batch = (bh // Q_HEADS).to(tl.int64)
        head = bh % Q_HEADS
    kv_head = head // (Q_HEADS // KV_HEADS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < n_tokens
    q_pos = start_pos + offs_m
    q = tl.load(q_ptr + batch * sq_b + offs_m[:, None] * sq_t + head * sq_h + offs_d[None, :],
                mask=mask_m[:, None], other=0.0).to(DOT_DTYPE)
    k_base = k_ptr + batch * sk_b + kv_head * sk_h
    v_base = v_ptr + batch * sv_b + kv_head * sv_h

    m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + _sink_logit(sinks_ptr, head, True)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + 1.0
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)

    hi = tl.minimum(start_pos + (pid_m + 1) * BLOCK_M, start_pos + n_tokens)
    first = 0  # the oldest key any query of this block sees
    if WINDOW > 0:
        first = tl.maximum(start_pos + pid_m * BLOCK_M - WINDOW + 1, 0)
    for n0 in range(first // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # Keys before `first` are never read: a paged window layer may have handed their blocks on already
        # (masked scores alone would not do: 0 * a stale NaN value is NaN).
        mask_n = (offs_n < hi) & (offs_n >= first)
        rows = _kv_rows(table_ptr, batch, offs_n, mask_n, st_b, PAGE)
        k = tl.load(k_base + rows[:, None] * sk_s + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
        visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        if WINDOW > 0:
            visible &= offs_n[None, :] > q_pos[:, None] - WINDOW
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rows[:, None] * sv_s + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + batch * so_b + offs_m[:, None] * so_t + head * so_h + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])


class _CacheLayout:
    """How a kernel walks a cache: per-sequence batch strides (contiguous) or a block table (paged, PAGE > 0)."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None, batch: int):
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        if block_table is None:
            self.page, self.table, self.st_b = 0, k_cache, 0  # the table pointer is never read
            self.sk_b, self.sv_b, self.positions = k_cache.stride(0), v_cache.stride(0), k_cache.shape[1]
            return
        blocks, page = k_cache.shape[:2]
        # pool block * PAGE + offset is a row index: blocks must be evenly spaced rows of one tensor
        assert k_cache.stride(0) == page * k_cache.stride(1) and v_cache.stride(0) == page * v_cache.stride(1)
        assert block_table.dtype == torch.int32 and block_table.shape[0] >= batch and block_table.stride(1) == 1
        self.page, self.table, self.st_b = page, block_table, block_table.stride(0)
        self.sk_b = self.sv_b = 0  # sequences differ only by their table row
        self.positions = block_table.shape[1] * page


def attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    start_pos: int,
    window: int = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, T, QH, D] at positions start_pos.., cache [B, S, KVH, D] holding keys 0..start_pos+T-1 -> [B, T, QH, D].

    With block_table int32 [B, max_blocks]: the cache is a paged pool [blocks, PAGE, KVH, D] (module docstring)."""
    batch, n_tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    layout = _CacheLayout(k_cache, v_cache, block_table, batch)
    assert q.stride(-1) == 1 and start_pos + n_tokens <= layout.positions and q_heads % kv_heads == 0
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    cfg = block_config("attn_prefill", q.device)
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_M"]), batch * q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, sinks, out, layout.table, layout.table,
        q.stride(0), q.stride(1), q.stride(2), layout.sk_b, k_cache.stride(1), k_cache.stride(2),
        layout.sv_b, v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2), layout.st_b,
        n_tokens, start_pos, scale * LOG2E,
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, WINDOW=window, PAGE=layout.page,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **_dot_args(q.dtype), VARLEN=False, **pdl(q.device),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def prefill_tiles(chunks: list[tuple[int, int, int, int]], device: torch.device) -> np.ndarray:
    """The tile list of attention_prefill_varlen: chunks (sequence, first row, length, start position) cut into
    the device's prefill tiles of BLOCK_M rows -> int32 [tiles, 4] (sequence, first row, rows, position)."""
    block_m = block_config("attn_prefill", device)["BLOCK_M"]
    tiles = [(seq, row + t, min(block_m, length - t), start + t)
             for seq, row, length, start in chunks for t in range(0, length, block_m)]
    return np.array(tiles, dtype=np.int32).reshape(-1, 4)


def attention_prefill_varlen(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    sinks: torch.Tensor,
    tiles: torch.Tensor,
    block_table: torch.Tensor,
    window: int = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt chunks of several sequences in one launch. q [rows, QH, D] holds the chunks' rows; tiles int32
    [tiles, 4] on q's device (prefill_tiles) says where each is; the paged pools and block_table as
    attention_prefill's (table row = the tiles' sequence). -> out [rows, QH, D]; rows no tile names are left alone.
    Each sequence's keys up to its tile's last position must be in the pools already."""
    rows, q_heads, head_dim = q.shape
    kv_heads = k_pool.shape[2]
    layout = _CacheLayout(k_pool, v_pool, block_table, int(block_table.shape[0]))
    assert layout.page > 0 and q.stride(-1) == 1 and q_heads % kv_heads == 0
    assert tiles.dtype == torch.int32 and tiles.is_contiguous() and tiles.shape[1:] == (4,)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
    cfg = block_config("attn_prefill", q.device)
    if tiles.shape[0] == 0:
        return out
    _prefill_kernel[(tiles.shape[0], q_heads)](
        q, k_pool, v_pool, sinks, out, layout.table, tiles,
        0, q.stride(0), q.stride(1), layout.sk_b, k_pool.stride(1), k_pool.stride(2),
        layout.sv_b, v_pool.stride(1), v_pool.stride(2), 0, out.stride(0), out.stride(1), layout.st_b,
        0, 0, scale * LOG2E,
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, WINDOW=window, PAGE=layout.page,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **_dot_args(q.dtype), VARLEN=True, **pdl(q.device),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


@triton.jit(do_not_specialize=["st_b"], do_not_specialize_on_alignment=["table_ptr"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, kv_lens_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, table_ptr, sinks_ptr, o_ptr, counter_ptr,
    sq_b, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, st_b, so_b, so_h, qk_scale,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, PAGE: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MERGE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    bk = tl.program_id(0)
    split = tl.program_id(1)
    batch = (bk // KV_HEADS).to(tl.int64)
    kv_head = bk % KV_HEADS
    GROUP: tl.constexpr = Q_HEADS // KV_HEADS
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + batch * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    q = q.to(DOT_DTYPE)

    kv_len = tl.load(kv_lens_ptr + batch)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(kv_len - WINDOW, 0)
    per_split = tl.cdiv(tl.cdiv(kv_len - lo, SPLITS), BLOCK_N) * BLOCK_N
    s_lo = lo + split * per_split
    s_hi = tl.minimum(s_lo + per_split, kv_len)
    k_base = k_ptr + batch * sk_b + kv_head * sk_h
    v_base = v_ptr + batch * sv_b + kv_head * sv_h

    # A finite floor instead of -inf: an empty split then yields (floor, 0, 0) without inf - inf = NaN.
    m_i = tl.zeros((BLOCK_G,), dtype=tl.float32) - 1.0e30
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
    for n0 in range(s_lo, s_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < s_hi
        rows = _kv_rows(table_ptr, batch, offs_n, mask_n, st_b, PAGE)
        k = tl.load(k_base + rows[:, None] * sk_s + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rows[:, None] * sv_s + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    out_ptrs = o_ptr + batch * so_b + heads[:, None] * so_h + offs_d[None, :]
    if SPLITS == 1:  # the whole key range: finish here
        sink = _sink_logit(sinks_ptr, heads, mask_g)
        m_all = tl.maximum(m_i, sink)
        w = tl.exp2(m_i - m_all)
        out = acc * w[:, None] / (l_i * w + tl.exp2(sink - m_all))[:, None]
        tl.store(out_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_g[:, None])
    else:
        row = (batch * Q_HEADS + heads) * SPLITS + split
        tl.store(part_m_ptr + row, m_i, mask=mask_g)
        tl.store(part_l_ptr + row, l_i, mask=mask_g)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_g[:, None])
        # MERGE (few splits): the group's last split to finish merges the pieces, so no second launch. With
        # many splits one program merging them all serially was slower than the combine kernel (BENCHMARKS.md).
        if MERGE:
            if last_to_arrive(counter_ptr + bk, SPLITS):
                first = (batch * Q_HEADS + heads) * SPLITS
                sink = _sink_logit(sinks_ptr, heads, mask_g)
                m_all = sink
                for s in tl.static_range(SPLITS):
                    m_all = tl.maximum(m_all, tl.load(part_m_ptr + first + s, mask=mask_g, other=0.0,
                                                      cache_modifier=".cg"))
                denom = tl.exp2(sink - m_all)
                out = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
                for s in tl.static_range(SPLITS):
                    w = tl.exp2(tl.load(part_m_ptr + first + s, mask=mask_g, other=0.0, cache_modifier=".cg") - m_all)
                    denom += w * tl.load(part_l_ptr + first + s, mask=mask_g, other=0.0, cache_modifier=".cg")
                    piece = tl.load(part_acc_ptr + (first + s)[:, None] * HEAD_DIM + offs_d[None, :],
                                    mask=mask_g[:, None], other=0.0, cache_modifier=".cg")
                    out += piece * w[:, None]
                tl.store(out_ptrs, (out / denom[:, None]).to(o_ptr.dtype.element_ty), mask=mask_g[:, None])


@triton.jit
def _decode_combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, sinks_ptr, o_ptr, so_b, so_h,
    Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    bh = tl.program_id(0).to(tl.int64)
    batch = bh // Q_HEADS
    head = bh % Q_HEADS
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.load(part_m_ptr + bh * SPLITS + offs_s)
    l = tl.load(part_l_ptr + bh * SPLITS + offs_s)
    acc = tl.load(part_acc_ptr + (bh * SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :])
    sink = _sink_logit(sinks_ptr, head, True)
    m_all = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp2(m - m_all)
    denom = tl.sum(l * w, axis=0) + tl.exp2(sink - m_all)
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(o_ptr + batch * so_b + head * so_h + offs_d, out.to(o_ptr.dtype.element_ty))


def pick_splits(batch: int, kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """A power of two giving about two programs per SM, but no split shorter than one key block."""
    splits = 1
    while batch * kv_heads * splits < 2 * num_sms(device) and max_len >= splits * 2 * block_n and splits < 64:
        splits *= 2
    return splits


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    kv_lens: torch.Tensor,
    window: int = 0,
    scale: float | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, QH, D], one new token per sequence; cache [B, S, KVH, D]; kv_lens int32 [B] keys valid (incl. the new one).

    `splits` (a power of two) is fixed by the caller for CUDA graphs; by default it is picked for the cache size.
    With block_table int32 [B, max_blocks]: the cache is a paged pool [blocks, PAGE, KVH, D] (module docstring).
    """
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    layout = _CacheLayout(k_cache, v_cache, block_table, batch)
    assert q.stride(-1) == 1 and q_heads % kv_heads == 0
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    cfg = block_config("attn_decode", q.device)
    if splits is None:
        span = min(window, layout.positions) if window > 0 else layout.positions
        splits = pick_splits(batch, kv_heads, span, cfg["BLOCK_N"], q.device)
    assert splits & (splits - 1) == 0
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
    part_m = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    group = q_heads // kv_heads
    merge = splits == 1 or splits <= MERGE_SPLITS  # (one split always writes its output itself)
    counters = arrival_counters(q.device, batch * kv_heads) if merge and splits > 1 else part_m
    _decode_split_kernel[(batch * kv_heads, splits)](
        q, k_cache, v_cache, kv_lens, part_m, part_l, part_acc, layout.table, sinks, out, counters,
        q.stride(0), q.stride(1), layout.sk_b, k_cache.stride(1), k_cache.stride(2),
        layout.sv_b, v_cache.stride(1), v_cache.stride(2), layout.st_b, out.stride(0), out.stride(1), scale * LOG2E,
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, WINDOW=window, PAGE=layout.page, SPLITS=splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg["BLOCK_N"], **_dot_args(q.dtype),
        MERGE=merge, **pdl(q.device), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not merge:
        _decode_combine_kernel[(batch * q_heads,)](
            part_m, part_l, part_acc, sinks, out, out.stride(0), out.stride(1),
            Q_HEADS=q_heads, HEAD_DIM=head_dim, SPLITS=splits, **pdl(q.device),
            num_warps=1 if splits * head_dim <= 1024 else 4,
        )
    return out
