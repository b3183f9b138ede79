"""Fused QKV split + rotary embedding + KV-cache write against its reference and the reference model's RoPE."""

import pytest
import torch

from kubrick.engine.config import ModelConfig
from kubrick.engine.kernels import reference
from kubrick.engine.kernels.rope import rope_and_cache
from kubrick.engine.model import RotaryEmbedding

from .helpers import rel_error


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rope_and_cache_matches_reference(device, dtype, bound):
    q_heads, kv_heads, head_dim, n = 4, 2, 64, 5
    rope = RotaryEmbedding(ModelConfig(head_dim=head_dim), device)  # YaRN factor 32, as gpt-oss
    positions = torch.tensor([3, 4, 5, 6, 7], device=device)
    cos, sin = rope.cos_sin(positions)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(device=device, dtype=dtype)
    caches = [torch.full((10, kv_heads, head_dim), float("nan"), dtype=dtype, device=device) for _ in range(4)]
    q = rope_and_cache(qkv, cos, sin, positions, caches[0], caches[1], q_heads, kv_heads)
    expected_q = reference.rope_and_cache(qkv, cos, sin, positions, caches[2], caches[3], q_heads, kv_heads)
    assert rel_error(q, expected_q) < bound
    assert rel_error(caches[0][3:8], caches[2][3:8]) < bound  # keys
    assert torch.equal(caches[1][3:8], caches[3][3:8])  # values: a copy
    assert caches[0][:3].isnan().all() and caches[0][8:].isnan().all()  # other rows untouched
    # The model's own rotation of the query heads agrees too.
    model_q = rope.rotate(qkv[:, : q_heads * head_dim].reshape(n, q_heads, head_dim), cos, sin)
    assert rel_error(q, model_q) < bound
