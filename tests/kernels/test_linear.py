"""The one-token linear GEMV (kernels/linear.py) against F.linear (+ residual)."""

import pytest
import torch
import torch.nn.functional as F

from kubrick.engine.kernels.linear import linear

from .helpers import rel_error


@pytest.mark.parametrize("n,k", [(64, 96), (40, 64)])  # K with a masked tail step; N past the last row block
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (False, False)])
def test_linear_gemv_matches_f_linear(device, n, k, with_bias, with_residual):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(n, generator=gen).to(device=device, dtype=torch.bfloat16) if with_bias else None
    r = torch.randn(1, n, generator=gen).to(device=device, dtype=torch.bfloat16) if with_residual else None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    if r is not None:
        expected = expected + r.float()
    out = linear(x, w, b, residual=r)
    assert out.shape == (1, n) and out.dtype == torch.bfloat16 and not out.isnan().any()
    assert rel_error(out, expected) < 1e-2


def test_linear_of_several_rows_is_f_linear(device):
    x = torch.randn(3, 32, device=device)
    w, b, r = torch.randn(16, 32, device=device), torch.randn(16, device=device), torch.randn(3, 16, device=device)
    torch.testing.assert_close(linear(x, w, b, residual=r), r + F.linear(x, w, b))


@pytest.mark.gpu  # the steps loaded ahead run only under programmatic dependent launch (sm90+)
@pytest.mark.parametrize("k", [96, 16])
def test_linear_gemv_with_weights_loaded_before_the_wait(k):
    # K 96 over steps of 32: the first step of W before the wait, the rest in the loop; K 16 has no whole step
    # (nothing ahead, the masked tail only). N 40 leaves a masked row block. With or without AHEAD the same
    # bits: the steps go into one accumulator in the same order.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, k, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(40, k, generator=gen) / k**0.5).to(device="cuda", dtype=torch.bfloat16)
    b = torch.randn(40, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    config = dict(BLOCK_N=8, BLOCK_K=32, num_warps=4)
    out = linear(x, w, b, config=config | dict(AHEAD=True))
    assert rel_error(out, F.linear(x.float(), w.float(), b.float())) < 1e-2
    torch.testing.assert_close(out, linear(x, w, b, config=config | dict(AHEAD=False)), rtol=0, atol=0)
