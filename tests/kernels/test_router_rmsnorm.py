"""Router top-k + softmax and RMSNorm kernels against their references."""

import pytest
import torch

from kubrick.engine.kernels import reference
from kubrick.engine.kernels.moe_gemv import gemv_input, new_gemv_input
from kubrick.engine.kernels.rmsnorm import add_rmsnorm, rmsnorm
from kubrick.engine.kernels.router import norm_router, router

from .helpers import rel_error


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rmsnorm_matches_reference(device, dtype, bound):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 200, generator=gen) * 3).to(device=device, dtype=dtype)  # 200: not a power of two
    w = torch.randn(200, generator=gen).to(device)
    out = rmsnorm(x, w)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_error(out, reference.rmsnorm(x, w)) < bound


def _poison(g):
    """Every byte of a GemvInput's buffers 0xFF (NaN in both layouts), so an entry left unwritten shows."""
    for t in (g.data, g.mult) if g.half else (g.data,):
        t.view(torch.uint8).fill_(0xFF)
    return g


def _same_gemv_input(a, b) -> bool:
    return torch.equal(a.data, b.data) and (not a.half or torch.equal(a.mult, b.mult))


@pytest.mark.parametrize("half", [False, True])
def test_rmsnorm_also_writes_the_moe_gemv_layout(device, half):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = torch.randn(64, generator=gen).to(device)
    gemv = _poison(new_gemv_input(3, 64, torch.bfloat16, device, config=dict(HALF=half)))
    out = rmsnorm(x, w, gemv_out=gemv)
    assert gemv.half == half and _same_gemv_input(gemv, gemv_input(out, config=dict(HALF=half)))  # every entry


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


@pytest.mark.parametrize("tokens,hidden,gemv", [(1, 600, "float32"), (1, 600, "half"), (3, 96, "half"),
                                               (3, 96, "float32"), (5, 200, None)])
def test_norm_router_is_the_residual_add_the_norm_and_the_router_in_one_launch(device, tokens, hidden, gemv):
    # 1 token of 600 splits the row over several programs (the last to arrive takes the top-k); the others
    # use one program per token. It must give what add_rmsnorm then router give, and fill every output.
    gen = torch.Generator().manual_seed(tokens + hidden)
    x = (torch.randn(tokens, hidden, generator=gen) * 4).to(device)  # the float32 stream of the last layer
    y = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)
    norm_w = torch.randn(hidden, generator=gen).to(device)
    w = torch.randn(32, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(32, generator=gen).to(device=device, dtype=torch.bfloat16)
    stream = torch.full((tokens, hidden), float("nan"), device=device)
    x_gemv = None
    if gemv:  # the GEMV's input layout, float32 or half (whose factor needs the largest |t| of the whole row)
        x_gemv = _poison(new_gemv_input(tokens, hidden, torch.bfloat16, device, config=dict(HALF=gemv == "half")))
    for _ in range(2):  # twice: the arrival counters must be left ready for the next launch
        t, ids, weights = norm_router(x, y, norm_w, 1e-5, w, b, 4, stream=stream, gemv_out=x_gemv, round_logits=True)
        h = x.to(torch.bfloat16) + y
        assert torch.equal(stream, h.float())
        assert t.dtype == torch.bfloat16 and rel_error(t, reference.rmsnorm(h, norm_w)) < 1e-2
        if gemv:
            assert _same_gemv_input(x_gemv, gemv_input(t, config=dict(HALF=gemv == "half")))
        rounded = (t.float() @ w.float().T + b.float()).to(torch.bfloat16).float()
        assert torch.equal(rounded.gather(1, ids.long()), rounded.topk(4, dim=-1).values)
        _, ref_weights = reference.router(t, w, b, 4, round_logits=True)
        assert rel_error(weights, ref_weights) < 1e-5


def test_norm_router_without_an_add_norms_x_itself(device):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 96, generator=gen).to(device=device, dtype=torch.bfloat16)
    norm_w = torch.randn(96, generator=gen).to(device)
    w = torch.randn(8, 96, generator=gen).to(device=device, dtype=torch.bfloat16)
    b = torch.zeros(8, device=device, dtype=torch.bfloat16)
    t, ids, _ = norm_router(x, None, norm_w, 1e-5, w, b, 2)
    assert rel_error(t, reference.rmsnorm(x, norm_w)) < 1e-2
    logits = t.float() @ w.float().T
    assert torch.allclose(logits.gather(1, ids.long()), logits.topk(2, dim=-1).values, rtol=1e-5, atol=1e-5)
