"""Sink attention kernels (prefill and split-KV decode) against kernels.reference.attention."""

import pytest
import torch

from kubrick.engine.kernels import reference
from kubrick.engine.kernels._common import block_config
from kubrick.engine.kernels.attention import (attention_decode, attention_prefill, attention_prefill_varlen,
                                              prefill_tiles)

from .helpers import poisoned, rel_error

BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def random_cache(batch, seq, q_heads, kv_heads, head_dim, n_tokens, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_tokens, q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    sinks = torch.randn(q_heads, generator=gen).to(device=device, dtype=torch.float32)
    return q, k, v, sinks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,start_pos", [(0, 0), (8, 0), (8, 11), (0, 5)])
def test_prefill_matches_reference(device, dtype, window, start_pos):
    n_tokens = 21
    q, k, v, sinks = random_cache(2, 40, 4, 2, 16, n_tokens, dtype, device, seed=window + start_pos)
    out = attention_prefill(q, k, v, sinks, start_pos=start_pos, window=window, out=poisoned(q.shape, dtype, device))
    positions = torch.arange(start_pos, start_pos + n_tokens, device=device)
    for b in range(2):
        expected = reference.attention(q[b], k[b], v[b], sinks, positions, start_pos + n_tokens, window)
        assert rel_error(out[b], expected) < BOUNDS[dtype]


def test_sink_takes_probability_mass(device):
    # One visible key: without a sink the output is exactly v; a big sink pulls it toward zero.
    q, k, v, _ = random_cache(1, 4, 2, 1, 16, 1, torch.float32, device, seed=1)
    quiet = attention_prefill(q, k, v, torch.full((2,), -1e4, device=device), start_pos=0)
    loud = attention_prefill(q, k, v, torch.full((2,), 1e4, device=device), start_pos=0)
    assert torch.allclose(quiet[0, 0], v[0, 0].expand(2, 16), atol=1e-5)
    assert loud.abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,splits", [(0, 1), (0, 4), (16, 2), (0, 8)])
def test_decode_matches_reference(device, dtype, window, splits):
    # Up to MERGE_SPLITS splits the last one to finish merges them; 8 go through the combine kernel.
    kv_lens = torch.tensor([1, 37, 60], dtype=torch.int32, device=device)
    q, k, v, sinks = random_cache(3, 64, 8, 2, 16, 1, dtype, device, seed=splits + window)
    q = q[:, 0]
    out = attention_decode(q, k, v, sinks, kv_lens, window=window, splits=splits, out=poisoned(q.shape, dtype, device))
    # The arrival counters must be left at zero: a second launch (a graph replay) merges the same way.
    assert torch.equal(attention_decode(q, k, v, sinks, kv_lens, window=window, splits=splits), out)
    for b, n in enumerate(kv_lens.tolist()):
        pos = torch.tensor([n - 1], device=device)
        expected = reference.attention(q[b : b + 1], k[b], v[b], sinks, pos, n, window)[0]
        assert rel_error(out[b], expected) < BOUNDS[dtype]


def paged(k, v, page, seed, stale_before=None):
    """The same keys/values scattered into a shuffled pool of PAGE-row blocks (NaN everywhere else), and the
    block table that finds them. stale_before[b]: sequence b's logical blocks before it point at a NaN block,
    as a sliding-window layer's released blocks do."""
    batch, seq, kv_heads, head_dim = k.shape
    per_seq = seq // page
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(batch * per_seq + 3, generator=gen)  # 3 spare blocks, left NaN
    table = order[: batch * per_seq].view(batch, per_seq).to(torch.int32)
    k_pool = torch.full((batch * per_seq + 3, page, kv_heads, head_dim), float("nan"), dtype=k.dtype, device=k.device)
    v_pool = k_pool.clone()
    for b in range(batch):
        for j in range(per_seq):
            k_pool[table[b, j]] = k[b, j * page : (j + 1) * page]
            v_pool[table[b, j]] = v[b, j * page : (j + 1) * page]
        if stale_before is not None:
            table[b, : stale_before[b]] = order[-1]
    return k_pool, v_pool, table.to(k.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,start_pos", [(0, 0), (8, 11), (0, 5)])
def test_paged_prefill_reads_blocks_in_place(device, dtype, window, start_pos):
    n_tokens = 21
    q, k, v, sinks = random_cache(2, 48, 4, 2, 16, n_tokens, dtype, device, seed=7 + start_pos)
    stale = [max(0, start_pos - window + 1) // 4] * 2 if window else None  # blocks no query of the chunk can see
    k_pool, v_pool, table = paged(k, v, page=4, seed=start_pos, stale_before=stale)
    out = attention_prefill(q, k_pool, v_pool, sinks, start_pos=start_pos, window=window, block_table=table,
                            out=poisoned(q.shape, dtype, device))
    positions = torch.arange(start_pos, start_pos + n_tokens, device=device)
    for b in range(2):
        expected = reference.attention(q[b], k[b], v[b], sinks, positions, start_pos + n_tokens, window)
        assert rel_error(out[b], expected) < BOUNDS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,splits", [(0, 1), (0, 4), (16, 2)])
def test_paged_decode_reads_blocks_in_place(device, dtype, window, splits):
    kv_lens = torch.tensor([1, 37, 60], dtype=torch.int32, device=device)
    q, k, v, sinks = random_cache(3, 64, 8, 2, 16, 1, dtype, device, seed=splits + window + 3)
    q = q[:, 0]
    stale = [max(0, n - window) // 8 for n in kv_lens.tolist()] if window else None
    k_pool, v_pool, table = paged(k, v, page=8, seed=splits, stale_before=stale)
    out = attention_decode(q, k_pool, v_pool, sinks, kv_lens, window=window, splits=splits, block_table=table,
                           out=poisoned(q.shape, dtype, device))
    for b, n in enumerate(kv_lens.tolist()):
        pos = torch.tensor([n - 1], device=device)
        expected = reference.attention(q[b : b + 1], k[b], v[b], sinks, pos, n, window)[0]
        assert rel_error(out[b], expected) < BOUNDS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 8])
def test_varlen_prefill_takes_several_sequences_chunks_in_one_launch(device, dtype, window):
    # A batched step's rows: a 1-row stand-in for a decode (left alone), then chunks of three sequences at
    # different positions, one longer than a tile, packed one after another; one launch for them all.
    tile = block_config("attn_prefill", torch.device(device))["BLOCK_M"]
    long = tile + tile // 2  # spans two tiles, the second partial
    seq, q_heads, kv_heads, head_dim = 4 * (-(-(11 + long) // 4)) + 4, 4, 2, 16
    _, k, v, sinks = random_cache(3, seq, q_heads, kv_heads, head_dim, 1, dtype, device, seed=window + 3)
    k_pool, v_pool, table = paged(k, v, page=4, seed=window)
    # (sequence, first row, length, start position)
    chunks = [(2, 1, 5, 0), (0, 6, long, 11), (1, 6 + long, 3, seq - 4)]
    rows = 1 + sum(length for _, _, length, _ in chunks)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(rows, q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    tiles = torch.from_numpy(prefill_tiles(chunks, torch.device(device))).to(device)
    assert tiles.shape[0] == len(chunks) + 1  # the long chunk's two tiles
    out = attention_prefill_varlen(q, k_pool, v_pool, sinks, tiles, table, window=window,
                                   out=poisoned(q.shape, dtype, device))
    assert torch.isnan(out[0]).all()  # no tile names row 0
    for b, row, length, start in chunks:
        positions = torch.arange(start, start + length, device=device)
        expected = reference.attention(q[row : row + length], k[b], v[b], sinks, positions, start + length, window)
        assert rel_error(out[row : row + length], expected) < BOUNDS[dtype]
