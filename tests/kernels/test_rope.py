"""Fused QKV split + rotary embedding + KV-cache write against its reference and the reference model's RoPE."""

import pytest
import torch

from kubrick.engine.config import ModelConfig
from kubrick.engine.kernels import reference
from kubrick.engine.kernels.linear import linear
from kubrick.engine.kernels.rope import interleave_rope_rows, qkv_rope_cache, rope_and_cache
from kubrick.engine.model import RotaryEmbedding

from .helpers import rel_error


@pytest.mark.parametrize("heads_per_program", [1, 4, 16])  # 4: q, k and v heads share programs; 16: past the end
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rope_and_cache_matches_reference(device, dtype, bound, heads_per_program):
    q_heads, kv_heads, head_dim, n = 5, 2, 64, 5
    rope = RotaryEmbedding(ModelConfig(head_dim=head_dim), device)  # YaRN factor 32, as gpt-oss
    positions = torch.tensor([3, 4, 5, 6, 7], device=device)
    cos, sin = rope.cos_sin(positions)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(device=device, dtype=dtype)
    caches = [torch.full((10, kv_heads, head_dim), float("nan"), dtype=dtype, device=device) for _ in range(4)]
    q = rope_and_cache(qkv, cos, sin, positions, caches[0], caches[1], q_heads, kv_heads,
                       heads_per_program=heads_per_program)
    expected_q = reference.rope_and_cache(qkv, cos, sin, positions, caches[2], caches[3], q_heads, kv_heads)
    assert rel_error(q, expected_q) < bound
    assert rel_error(caches[0][3:8], caches[2][3:8]) < bound  # keys
    assert torch.equal(caches[1][3:8], caches[3][3:8])  # values: a copy
    assert caches[0][:3].isnan().all() and caches[0][8:].isnan().all()  # other rows untouched
    # The model's own rotation of the query heads agrees too.
    model_q = rope.rotate(qkv[:, : q_heads * head_dim].reshape(n, q_heads, head_dim), cos, sin)
    assert rel_error(q, model_q) < bound


def _random_case(device, dtype, n, q_heads=5, kv_heads=2, head_dim=64):
    rope = RotaryEmbedding(ModelConfig(head_dim=head_dim), device)
    positions = torch.arange(3, 3 + n, device=device)
    cos, sin = rope.cos_sin(positions)
    caches = [torch.full((10, kv_heads, head_dim), float("nan"), dtype=dtype, device=device) for _ in range(4)]
    return cos, sin, positions, caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interleaved_rows_rotate_as_the_plain_layout(device, dtype):
    """qkv whose heads are in interleave_rope_rows' order gives exactly what the plain order gives."""
    q_heads, kv_heads, head_dim, n = 5, 2, 64, 4
    cos, sin, positions, caches = _random_case(device, dtype, n, q_heads, kv_heads, head_dim)
    qkv = torch.randn(n, (q_heads + 2 * kv_heads) * head_dim, generator=torch.Generator().manual_seed(1))
    qkv = qkv.to(device=device, dtype=dtype)
    paired = interleave_rope_rows(qkv.T, head_dim).T.contiguous()
    assert torch.equal(paired[:, 0::2][:, :32], qkv[:, :32]) and torch.equal(paired[:, 1::2][:, :32], qkv[:, 32:64])
    q = rope_and_cache(qkv, cos, sin, positions, caches[0], caches[1], q_heads, kv_heads)
    q_paired = rope_and_cache(paired, cos, sin, positions, caches[2], caches[3], q_heads, kv_heads, interleaved=True)
    assert torch.equal(q, q_paired)
    assert torch.equal(caches[0][3:7], caches[2][3:7]) and torch.equal(caches[1][3:7], caches[3][3:7])


# BLOCK_N 2 and 4: one or two rotation pairs a program (the fused GEMV); 1: a pair would straddle programs,
# so linear() and rope_and_cache run instead.
@pytest.mark.parametrize("block_n", [2, 4, 1])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_qkv_rope_cache_matches_projection_then_rope(device, dtype, bound, n, block_n):
    """The QKV GEMV with RoPE and the cache write in its epilogue, on weights in RoPE's pairs, against the
    reference (F.linear on the plain weights, then the reference rotation); at one token it equals our own
    GEMV followed by rope_and_cache bit for bit (the same sums, the same roundings)."""
    q_heads, kv_heads, head_dim, hidden = 5, 2, 64, 96
    cos, sin, positions, caches = _random_case(device, dtype, n, q_heads, kv_heads, head_dim)
    gen = torch.Generator().manual_seed(2)
    rows = (q_heads + 2 * kv_heads) * head_dim
    w = (torch.randn(rows, hidden, generator=gen) / hidden**0.5).to(device=device, dtype=dtype)
    b = torch.randn(rows, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(n, hidden, generator=gen).to(device=device, dtype=dtype)
    config = {"BLOCK_N": block_n}
    q = qkv_rope_cache(x, interleave_rope_rows(w, head_dim), interleave_rope_rows(b, head_dim), cos, sin, positions,
                       caches[0], caches[1], q_heads, kv_heads, config=config)
    expected = reference.rope_and_cache(torch.nn.functional.linear(x, w, b), cos, sin, positions, caches[2], caches[3],
                                        q_heads, kv_heads)
    assert rel_error(q, expected) < bound
    assert rel_error(caches[0][3:3 + n], caches[2][3:3 + n]) < bound  # keys
    assert rel_error(caches[1][3:3 + n], caches[3][3:3 + n]) < bound  # values
    assert caches[0][:3].isnan().all() and caches[0][3 + n:].isnan().all()  # other rows untouched
    if n == 1:
        ours = [torch.full_like(caches[0], float("nan")) for _ in range(2)]
        q_ours = rope_and_cache(linear(x, w, b, config=config), cos, sin, positions, *ours, q_heads, kv_heads)
        assert torch.equal(q, q_ours)
        assert torch.equal(caches[0][3], ours[0][3]) and torch.equal(caches[1][3], ours[1][3])


@pytest.mark.parametrize("kv_lens", ["each", "last", "none"])
def test_step_inputs_match_the_model(device, kv_lens):
    """One launch gives what the model's first ops give: the embedding rows, RotaryEmbedding.cos_sin at the
    positions (float32 rounding apart), and kv_lens = position + 1 for each token or the last."""
    from kubrick.engine.kernels.step_inputs import KV_LENS_EACH, KV_LENS_LAST, KV_LENS_NONE, step_inputs

    kind = {"each": KV_LENS_EACH, "last": KV_LENS_LAST, "none": KV_LENS_NONE}[kv_lens]
    rope = RotaryEmbedding(ModelConfig(head_dim=64), device)  # YaRN factor 32, as gpt-oss
    embedding = torch.randn(50, 96, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=torch.bfloat16)
    tokens = torch.tensor([7, 0, 49, 7], device=device)
    positions = torch.tensor([5, 4096, 131071, 0], device=device)
    x, cos, sin, lens = step_inputs(tokens, positions, embedding, rope.inv_freq, rope.concentration, kind)
    assert torch.equal(x, embedding[tokens])
    expected_cos, expected_sin = rope.cos_sin(positions)
    assert (cos - expected_cos).abs().max() < 1e-5 and (sin - expected_sin).abs().max() < 1e-5
    if kind == KV_LENS_EACH:
        assert lens.dtype == torch.int32 and lens.tolist() == [6, 4097, 131072, 1]
    elif kind == KV_LENS_LAST:
        assert lens.tolist() == [1]
    else:
        assert lens is None


@pytest.mark.gpu  # the interpreter compiles nothing
def test_step_inputs_compile_once_for_every_step_size():
    # A serving step's token count changes every step; a compile mid-serving stalls every stream ~0.5 s.
    from kubrick.engine.kernels.step_inputs import KV_LENS_EACH, _step_inputs_kernel, step_inputs

    rope = RotaryEmbedding(ModelConfig(head_dim=64), "cuda")
    embedding = torch.randn(50, 96, device="cuda", dtype=torch.bfloat16)
    compiled = []
    for n in (1, 16, 17, 64, 333, 512):
        tokens = torch.randint(0, 50, (n,), device="cuda")
        x, *_ = step_inputs(tokens, torch.arange(n, device="cuda"), embedding, rope.inv_freq, rope.concentration,
                            KV_LENS_EACH)
        assert torch.equal(x, embedding[tokens])
        compiled.append(len(_step_inputs_kernel.device_caches[torch.cuda.current_device()][0]))
    assert compiled[1:] == compiled[:-1], compiled
