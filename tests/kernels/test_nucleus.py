"""The top-p cut without a sort (kernels/nucleus.py) against the sort that defines it (sampler.cuts): the same
least logit of every row's nucleus, peaked rows and flat ones, ties, negative logits, a top-k bound beside it."""

import pytest
import torch

from kubrick.engine.kernels.nucleus import top_p_cut
from kubrick.engine.sampler import _cuts_on_gpu, cuts

from .helpers import compiles_once_for_every_batch


def _reference(logits, temperature, top_p, top_k=None):
    rows, vocab = logits.shape
    k = torch.full((rows,), float(vocab)) if top_k is None else top_k.float()
    return cuts(logits.cpu(), temperature.cpu(), k, top_p.cpu())


def _mass_at_or_above(logits, temperature, cut):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return float(probs[logits.float() >= cut].sum())


def _assert_same_cuts(logits, temperature, top_p, got, want):
    rounding = 1e-9 * logits.shape[1]  # float32 sums over the row, in two orders
    for row in range(logits.shape[0]):
        if got[row] != want[row]:  # allowed only where the running sum meets top_p within that rounding
            x, t, p = logits[row].cpu(), float(temperature[row]), float(top_p[row])
            for cut in (float(got[row]), float(want[row])):
                assert abs(_mass_at_or_above(x, t, cut) - p) < rounding, (row, float(got[row]), float(want[row]))


def test_the_cut_is_the_sorted_reference_s_on_peaked_and_flat_rows(device):
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.05, 1.0, 3.0, 8.0, 1.0, 2.0])  # near-uniform … one token holding most of the mass
    logits = torch.randn(6, 1500, generator=g) * spread[:, None] - 4.0  # mostly negative keys
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.2, 2.5])
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.999, 0.05])
    got = top_p_cut(logits.to(device), temperature.to(device), top_p.to(device), block=128).cpu()
    want = _reference(logits, temperature, top_p)
    _assert_same_cuts(logits, temperature, top_p, got, want)
    kept = [(logits[r] >= got[r]).sum().item() for r in range(6)]
    assert kept[0] > 1000 and kept[3] < 20  # flat rows keep most tokens, a peaked one a few: a real nucleus


def test_ties_at_the_cut_are_kept_and_a_tiny_top_p_keeps_the_maximum(device):
    values = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5, -3.0])  # few distinct values: ties everywhere
    g = torch.Generator().manual_seed(1)
    logits = values[torch.randint(0, 6, (4, 700), generator=g)]
    logits[3, 123] = 9.0  # one token far above the rest
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0])
    top_p = torch.tensor([0.6, 0.9, 0.999, 1e-4])
    got = top_p_cut(logits.to(device), temperature.to(device), top_p.to(device), block=128).cpu()
    want = _reference(logits, temperature, top_p)
    assert got.tolist() == want.tolist()
    assert got[3] == 9.0


def test_a_top_k_bound_and_top_p_together_as_the_scheduler_asks(device):
    # rows: top-p only, top-k only, both, top-k with top-p reaching beyond it; -inf logits (a masked id) too
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1200, generator=g) * 2.0
    logits[:, 7] = float("-inf")
    top_ks, top_ps = [1200, 40, 300, 5], [0.8, 1.0, 0.6, 0.99]
    temperature = [1.0, 0.9, 1.4, 1.0]
    settings = torch.tensor([temperature, top_ks, top_ps], dtype=torch.float32)
    got = _cuts_on_gpu(logits.to(device), settings.to(device), top_ks, top_ps).cpu()
    want = cuts(logits, *settings)
    _assert_same_cuts(logits, settings[0], settings[2], got, want)
    assert got[1] == torch.topk(logits[1], 40).values[-1] and got[3] == torch.topk(logits[3], 5).values[-1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_real_vocabulary_on_the_gpu(dtype):
    rows, vocab = 64, 201_088
    g = torch.Generator(device="cuda").manual_seed(3)
    spread = torch.linspace(0.1, 6, rows, device="cuda")[:, None]  # flat rows … peaked ones
    logits = (torch.randn(rows, vocab, device="cuda", generator=g) * spread).to(dtype)
    temperature = torch.linspace(0.3, 1.5, rows, device="cuda")
    top_p = torch.linspace(0.05, 0.99, rows, device="cuda")
    got = top_p_cut(logits, temperature, top_p).cpu()
    _assert_same_cuts(logits.cpu(), temperature.cpu(), top_p.cpu(), got, _reference(logits, temperature, top_p))


@pytest.mark.gpu
def test_one_compiled_kernel_pair_serves_every_batch_size():
    from kubrick.engine.kernels import nucleus

    x = torch.randn(64, 201_088, device="cuda")
    assert compiles_once_for_every_batch(
        (nucleus._stats_kernel, nucleus._level_kernel),
        lambda rows: top_p_cut(x[:rows], torch.ones(rows, device="cuda"), torch.full((rows,), 0.9, device="cuda")))
