"""Sampling: greedy is repeatable, a seed fixes the tokens, and top-k / top-p really narrow the choice."""

from __future__ import annotations

import torch

from kubrick.engine.api import SamplingParams
from kubrick.engine.sampler import Sampler


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
