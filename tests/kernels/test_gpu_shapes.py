"""The kernels at gpt-oss-20b's real shapes on a CUDA GPU (compiled, bf16 tensor-core dots)."""

import pytest
import torch

from kubrick.engine.kernels import moe, reference
from kubrick.engine.kernels.attention import attention_decode, attention_prefill
from kubrick.engine.kernels.moe_gemv import moe_gemv
from kubrick.engine.kernels.moe_grouped import moe_grouped
from kubrick.engine.config import ModelConfig
from kubrick.engine.kernels.rmsnorm import rmsnorm
from kubrick.engine.kernels.linear import linear
from kubrick.engine.kernels.rope import interleave_rope_rows, qkv_rope_cache, rope_and_cache
from kubrick.engine.model import RotaryEmbedding
from kubrick.engine.kernels.router import router

from .helpers import poisoned, random_moe, rel_error

pytestmark = pytest.mark.gpu

HIDDEN, INTER, EXPERTS, TOPK = 2880, 2880, 32, 4
Q_HEADS, KV_HEADS, HEAD_DIM, WINDOW = 64, 8, 64, 128


@pytest.mark.parametrize("tokens", [1, 4, 8])
def test_moe_gemv_real_shape(tokens):
    x, ids, weights, w = random_moe(tokens, HIDDEN, INTER, EXPERTS, TOPK, torch.bfloat16, "cuda", seed=tokens)
    out = moe_gemv(x, ids, weights, *w)
    assert rel_error(out, reference.moe(x, ids, weights, *w)) < 1e-2


@pytest.mark.parametrize("tokens", [1, 8])
def test_moe_gemv_half_layout_agrees_with_the_float32_layout(tokens):
    # The table's half layout (fp16 activation pairs, sums of 8 products in fp16) against the float32 one: on
    # the H100 2.0e-3 / 2.1e-3 apart at 1 / 8 tokens, the bf16 outputs' own rounding.
    x, ids, weights, w = random_moe(tokens, HIDDEN, INTER, EXPERTS, TOPK, torch.bfloat16, "cuda", seed=tokens)
    half = moe_gemv(x, ids, weights, *w)
    assert rel_error(half, moe_gemv(x, ids, weights, *w, config=dict(HALF=False))) < 4e-3
    assert rel_error(half, reference.moe(x, ids, weights, *w)) < 1e-2


@pytest.mark.parametrize("scale", [1e-3, 300.0])
def test_moe_gemv_half_layout_keeps_far_activations_in_range(scale):
    # The per-token power of two must keep activations far from 1 in fp16's range (no inf, no lost values).
    # At 300x the gap grows (5.5e-3 on the H100): swiglu's clamp leaves h carrying mlp1's absolute error, which
    # grows with |x|; so this bound only catches overflow or a wrong factor.
    x, ids, weights, w = random_moe(1, HIDDEN, INTER, EXPERTS, TOPK, torch.bfloat16, "cuda", seed=5)
    x = (x.float() * scale).to(torch.bfloat16)
    half = moe_gemv(x, ids, weights, *w)
    assert rel_error(half, moe_gemv(x, ids, weights, *w, config=dict(HALF=False))) < 2e-2


@pytest.mark.parametrize("tokens", [64, 1000])
def test_moe_grouped_real_shape(tokens):
    x, ids, weights, w = random_moe(tokens, HIDDEN, INTER, EXPERTS, TOPK, torch.bfloat16, "cuda", seed=tokens)
    expected = reference.moe(x, ids, weights, *w)
    assert rel_error(moe_grouped(x, ids, weights, *w), expected) < 1e-2
    assert rel_error(moe(x, ids, weights, *w), expected) < 1e-2


def test_moe_paths_survive_cuda_graph_capture():
    x, ids, weights, w = random_moe(8, HIDDEN, INTER, EXPERTS, TOPK, torch.bfloat16, "cuda", seed=3)
    expected = reference.moe(x, ids, weights, *w)
    for fn in (moe_gemv, moe_grouped):
        fn(x, ids, weights, *w)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(x, ids, weights, *w)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, expected) < 1e-2


@pytest.mark.parametrize("window", [0, WINDOW])
def test_attention_prefill_real_shape(window):
    gen = torch.Generator(device="cuda").manual_seed(window)
    n_tokens, start = 700, 100
    q = torch.randn(1, n_tokens, Q_HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(1, 1024, KV_HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sinks = torch.randn(Q_HEADS, device="cuda", generator=gen)
    out = attention_prefill(q, k, v, sinks, start_pos=start, window=window, out=poisoned(q.shape, q.dtype, "cuda"))
    pos = torch.arange(start, start + n_tokens, device="cuda")
    expected = reference.attention(q[0], k[0], v[0], sinks, pos, start + n_tokens, window)
    assert rel_error(out[0], expected) < 1e-2


@pytest.mark.parametrize("window", [0, WINDOW])
def test_attention_decode_real_shape(window):
    gen = torch.Generator(device="cuda").manual_seed(window + 1)
    lens = torch.tensor([1, 129, 2000, 4096], dtype=torch.int32, device="cuda")
    q = torch.randn(4, Q_HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(4, 4096, KV_HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sinks = torch.randn(Q_HEADS, device="cuda", generator=gen)
    out = attention_decode(q, k, v, sinks, lens, window=window, out=poisoned(q.shape, q.dtype, "cuda"))
    for b, n in enumerate(lens.tolist()):
        pos = torch.tensor([n - 1], device="cuda")
        expected = reference.attention(q[b : b + 1], k[b], v[b], sinks, pos, n, window)[0]
        assert rel_error(out[b], expected) < 1e-2


def test_router_and_rmsnorm_real_shape():
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(64, HIDDEN, device="cuda", generator=gen, dtype=torch.bfloat16)
    norm_w = torch.randn(HIDDEN, device="cuda", generator=gen)
    assert rel_error(rmsnorm(x, norm_w), reference.rmsnorm(x, norm_w)) < 1e-2
    w = torch.randn(EXPERTS, HIDDEN, device="cuda", generator=gen, dtype=torch.bfloat16)
    b = torch.randn(EXPERTS, device="cuda", generator=gen, dtype=torch.bfloat16)
    ids, weights = router(x, w, b, TOPK)
    logits = x.float() @ w.float().T + b.float()
    ref_ids, ref_weights = reference.router(x, w, b, TOPK)
    assert torch.allclose(logits.gather(1, ids.long()), logits.gather(1, ref_ids.long()), rtol=1e-4, atol=1e-4)
    assert rel_error(weights, ref_weights) < 1e-4


@pytest.mark.parametrize("n_tokens", [1, 15, 16, 300])  # one head a program below 16 tokens, 16 from there
def test_rope_and_cache_real_shape(n_tokens):
    rope = RotaryEmbedding(ModelConfig(), torch.device("cuda"))
    positions = torch.arange(4000, 4000 + n_tokens, device="cuda")
    cos, sin = rope.cos_sin(positions)
    qkv = torch.randn(n_tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    caches = [torch.zeros(4400, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    q = rope_and_cache(qkv, cos, sin, positions, caches[0], caches[1], Q_HEADS, KV_HEADS)
    expected = reference.rope_and_cache(qkv, cos, sin, positions, caches[2], caches[3], Q_HEADS, KV_HEADS)
    assert rel_error(q, expected) < 1e-2
    assert rel_error(caches[0], caches[2]) < 1e-2 and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("n_tokens", [1, 4])  # the fused GEMV, then linear + rope_and_cache
def test_qkv_rope_cache_real_shape(n_tokens):
    """20b's QKV projection with RoPE and the cache write in its epilogue: at one token exactly our GEMV followed
    by rope_and_cache (the table's blocks on this GPU), and within bf16 of the reference either way."""
    rope = RotaryEmbedding(ModelConfig(), torch.device("cuda"))
    positions = torch.arange(4000, 4000 + n_tokens, device="cuda")
    cos, sin = rope.cos_sin(positions)
    rows = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    w = torch.randn(rows, 2880, device="cuda", dtype=torch.bfloat16) / 2880**0.5
    b = torch.randn(rows, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n_tokens, 2880, device="cuda", dtype=torch.bfloat16)
    caches = [torch.zeros(4400, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
    q = qkv_rope_cache(x, interleave_rope_rows(w, HEAD_DIM), interleave_rope_rows(b, HEAD_DIM), cos, sin, positions,
                       caches[0], caches[1], Q_HEADS, KV_HEADS)
    expected = reference.rope_and_cache(torch.nn.functional.linear(x, w, b), cos, sin, positions, caches[2], caches[3],
                                        Q_HEADS, KV_HEADS)
    assert rel_error(q, expected) < 1e-2
    assert rel_error(caches[0], caches[2]) < 1e-2 and rel_error(caches[1], caches[3]) < 1e-2
    if n_tokens == 1:
        q_ours = rope_and_cache(linear(x, w, b), cos, sin, positions, caches[4], caches[5], Q_HEADS, KV_HEADS)
        assert torch.equal(q, q_ours) and torch.equal(caches[0], caches[4]) and torch.equal(caches[1], caches[5])
