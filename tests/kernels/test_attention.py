"""Sink attention kernels (prefill and split-KV decode) against kernels.reference.attention."""

import pytest
import torch

from kubrick.engine.kernels import reference
from kubrick.engine.kernels.attention import attention_decode, attention_prefill

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
@pytest.mark.parametrize("window,splits", [(0, 1), (0, 4), (16, 2)])
def test_decode_matches_reference(device, dtype, window, splits):
    kv_lens = torch.tensor([1, 37, 60], dtype=torch.int32, device=device)
    q, k, v, sinks = random_cache(3, 64, 8, 2, 16, 1, dtype, device, seed=splits + window)
    q = q[:, 0]
    out = attention_decode(q, k, v, sinks, kv_lens, window=window, splits=splits, out=poisoned(q.shape, dtype, device))
    for b, n in enumerate(kv_lens.tolist()):
        pos = torch.tensor([n - 1], device=device)
        expected = reference.attention(q[b : b + 1], k[b], v[b], sinks, pos, n, window)[0]
        assert rel_error(out[b], expected) < BOUNDS[dtype]
