"""Sampling: greedy is repeatable, a seed fixes the tokens whatever the batch, draws follow the softmax, and
top-k / top-p really narrow the choice (the torch path; tests/kernels/test_sampling_kernel.py has the kernel)."""

from __future__ import annotations

import pytest
import torch

from kubrick.engine.api import SamplingParams
from kubrick.engine.sampler import Sampler, cuts, sample_rows


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 3


def _draw(params: SamplingParams, n: int = 200, logits=None) -> list[int]:
    sampler = Sampler(params)
    logits = _logits() if logits is None else logits
    return [sampler(logits) for _ in range(n)]


def test_temperature_zero_picks_the_most_likely_token_every_time():
    logits = _logits()
    assert set(_draw(SamplingParams(temperature=0), n=20)) == {int(logits.argmax())}


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    params = SamplingParams(temperature=1.0, seed=42)
    assert _draw(params) == _draw(params)
    assert _draw(params) != _draw(SamplingParams(temperature=1.0, seed=43))


def test_without_a_seed_two_runs_differ():
    assert _draw(SamplingParams(temperature=1.0)) != _draw(SamplingParams(temperature=1.0))


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits = _logits()
    allowed = set(torch.topk(logits, 5).indices.tolist())
    drawn = _draw(SamplingParams(temperature=2.0, top_k=5, seed=1), n=500)
    assert set(drawn) <= allowed and len(set(drawn)) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([4.0, 3.0, 2.0, 0.0, -1.0])  # probabilities ≈ .64 .24 .09 .01 .00
    drawn = _draw(SamplingParams(temperature=1.0, top_p=0.8, seed=2), n=500, logits=logits)
    assert set(drawn) == {0, 1}
    assert set(_draw(SamplingParams(temperature=1.0, top_p=1e-6, seed=2), n=50, logits=logits)) == {0}


def test_higher_temperature_spreads_the_choice():
    cool = _draw(SamplingParams(temperature=0.2, seed=5), n=300)
    hot = _draw(SamplingParams(temperature=3.0, seed=5), n=300)
    assert len(set(hot)) > 3 * len(set(cool))


def _rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_a_seeded_request_draws_the_same_tokens_alone_and_beside_others():
    # The draws are keyed by the request's seed and draw count: the rows beside it change nothing.
    logits = _rows(4)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    alone = Sampler(params)
    solo = [int(sample_rows(logits[2:3], [alone])[0]) for _ in range(30)]
    mine = Sampler(params)
    others = [Sampler(SamplingParams(temperature=t, seed=s)) for t, s in ((0.7, 1), (0, None), (2.0, 9))]
    batched = [int(sample_rows(logits[[0, 1, 2, 3]], [others[0], others[1], mine, others[2]])[2]) for _ in range(30)]
    assert batched == solo
    assert len(set(solo)) > 3  # really drawn, not the same token every time


def test_greedy_rows_beside_sampled_ones_take_the_most_likely_token():
    logits = _rows(3)
    samplers = [Sampler(SamplingParams(temperature=0)), Sampler(SamplingParams(temperature=1.5, seed=2)),
                Sampler(SamplingParams(temperature=0))]
    for _ in range(10):
        picks = sample_rows(logits, samplers)
        assert picks[0] == logits[0].argmax() and picks[2] == logits[2].argmax()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_draws_follow_the_softmax_at_the_temperature(temperature):
    logits = torch.tensor([4.0, 3.0, 2.0, 0.0, -1.0])
    drawn = torch.tensor(_draw(SamplingParams(temperature=temperature, seed=3), n=3000, logits=logits))
    seen = torch.bincount(drawn, minlength=5) / 3000
    assert (seen - torch.softmax(logits / temperature, 0)).abs().max() < 0.03  # ~3.5 standard errors


def _kept_the_old_way(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The tokens a draw may pick, computed as the sampler did before it drew on the device."""
    x = logits / temperature
    if 0 < top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    probs = torch.softmax(x, 0)
    if top_p >= 1.0:
        return {int(i) for i in torch.nonzero(probs > 0)}
    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, 0) - ordered
    return {int(i) for i, p, b in zip(order, ordered, before) if p > 0 and b < top_p}


def _cut(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    n, vocab = logits.shape
    return cuts(logits, torch.full((n,), temperature), torch.full((n,), float(top_k or vocab)), torch.full((n,), top_p))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.6, 10, 1.0), (1.3, 20, 0.7), (1.0, 5, 0.99)])
def test_the_cut_keeps_the_top_k_then_the_smallest_set_reaching_top_p(temperature, top_k, top_p):
    logits = _rows(3, vocab=200, seed=4)
    cut = _cut(logits, temperature, top_k, top_p)
    for row in range(logits.shape[0]):
        kept = {int(i) for i in torch.nonzero(logits[row] >= cut[row])}
        assert kept == _kept_the_old_way(logits[row], temperature, top_k, top_p)
        assert 1 <= len(kept) < 200


def test_top_k_alone_keeps_all_k_even_when_one_token_holds_nearly_all_the_mass():
    # float32 probabilities sum to 1.0 after the first token here: top_p = 1 must not cut the rest of the k.
    logits = torch.tensor([[20.0, 0.0, -1.0, -2.0, -3.0], [8.0, 0.0, -1.0, -2.0, -3.0]])
    assert _cut(logits, 1.0, 3, 1.0).tolist() == [-1.0, -1.0]
    assert _cut(logits[1:], 0.5, 2, 1.0).tolist() == [0.0]


def test_tokens_tied_with_the_k_th_are_kept_and_counted_in_the_nucleus():
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.5]])
    for top_p in (0.99, 0.999, 1.0):
        kept = {int(i) for i in torch.nonzero(logits[0] >= _cut(logits, 1.0, 3, top_p)[0])}
        assert kept == _kept_the_old_way(logits[0], 1.0, 3, top_p)


def test_a_vanishing_temperature_draws_the_most_likely_token():
    # x / 1e-39 would overflow to +inf for every positive logit: the draw must still be the argmax.
    for row in ([1.0, 5.0, 3.0, -2.0], [-1.0, -5.0, -0.5, -2.0]):
        logits = torch.tensor(row)
        assert set(_draw(SamplingParams(temperature=1e-39, seed=1), n=5, logits=logits)) == {int(logits.argmax())}
