"""Router top-k + softmax and RMSNorm kernels against their references."""

import pytest
import torch

from kubrick.engine.kernels import reference
from kubrick.engine.kernels.moe_gemv import gemv_layout
from kubrick.engine.kernels.rmsnorm import add_rmsnorm, rmsnorm
from kubrick.engine.kernels.router import router

from .helpers import rel_error


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rmsnorm_matches_reference(device, dtype, bound):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 200, generator=gen) * 3).to(device=device, dtype=dtype)  # 200: not a power of two
    w = torch.randn(200, generator=gen).to(device)
    out = rmsnorm(x, w)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_error(out, reference.rmsnorm(x, w)) < bound


def test_rmsnorm_also_writes_the_moe_gemv_layout(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = torch.randn(64, generator=gen).to(device)
    gemv = torch.full((3, 8, 8), float("nan"), device=device)
    out = rmsnorm(x, w, gemv_out=gemv)
    torch.testing.assert_close(gemv, gemv_layout(out), rtol=0, atol=0)  # every entry written, exactly


def test_rmsnorm_of_a_float32_stream_rounds_it_to_the_model_dtype_first(device):
    # Between layers the stream is float32 (the MoE sums into it); the model sees it rounded to bf16.
    gen = torch.Generator().manual_seed(2)
    stream = (torch.randn(4, 200, generator=gen) * 3).to(device)
    w = torch.randn(200, generator=gen).to(device)
    out = rmsnorm(stream, w, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = reference.rmsnorm(stream.to(torch.bfloat16), w)
    assert rel_error(out, expected) < 1e-2
    # The same as the norm of the stream rounded first: the rounding happens before the statistics.
    assert torch.equal(rmsnorm(stream.to(torch.bfloat16), w), out)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_add_rmsnorm_adds_as_the_model_does_and_writes_the_float32_stream(device, x_dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 200, generator=gen) * 4).to(device=device, dtype=x_dtype)  # float32: last layer's stream
    y = torch.randn(5, 200, generator=gen).to(device=device, dtype=torch.bfloat16)  # the attention's projection
    w = torch.randn(200, generator=gen).to(device)
    stream = torch.full((5, 200), float("nan"), device=device)
    t = add_rmsnorm(x, y, w, stream=stream)
    h = x.to(torch.bfloat16) + y  # what the reference model's bf16 add gives
    assert torch.equal(stream, h.float())  # bit for bit, every entry written
    assert t.dtype == torch.bfloat16 and rel_error(t, reference.rmsnorm(h, w)) < 1e-2
    in_place = x.float().clone()
    add_rmsnorm(in_place, y, w, stream=in_place)  # the stream may be x itself
    assert torch.equal(in_place, h.float())


@pytest.mark.parametrize("experts,k,tokens,hidden", [(32, 4, 7, 96), (12, 3, 7, 96), (32, 4, 1, 600)])
def test_router_picks_the_top_k_and_softmaxes_them(device, experts, k, tokens, hidden):
    # (1 token, hidden 600) splits the logits over several programs; the others use one per token.
    gen = torch.Generator().manual_seed(experts)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = torch.randn(experts, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(experts, generator=gen).to(device=device, dtype=torch.bfloat16)
    ids, weights = router(x, w, b, k)
    ref_ids, ref_weights = reference.router(x, w, b, k)
    logits = x.float() @ w.float().T + b.float()
    # Robust to near-ties: the chosen experts' logits must be the k largest, in falling order.
    chosen = logits.gather(1, ids.long())
    assert torch.allclose(chosen, logits.gather(1, ref_ids.long()), rtol=1e-5, atol=1e-5)
    assert (ids >= 0).all() and (ids < experts).all()
    assert all(len(set(row)) == k for row in ids.tolist())
    assert rel_error(weights, ref_weights) < 1e-5
    assert torch.allclose(weights.sum(-1), torch.ones(tokens, device=device))


def test_router_can_round_logits_to_bf16_like_a_bf16_matmul(device):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(16, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = torch.randn(8, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(8, generator=gen).to(device=device, dtype=torch.bfloat16)
    ids, weights = router(x, w, b, 2, round_logits=True)
    _, ref_weights = reference.router(x, w, b, 2, round_logits=True)
    rounded = (x.float() @ w.float().T + b.float()).to(torch.bfloat16).float()
    # The chosen rounded logits are the two largest rounded logits (ties may pick either expert).
    assert torch.equal(rounded.gather(1, ids.long()), rounded.topk(2, dim=-1).values)
    assert rel_error(weights, ref_weights) < 1e-5
