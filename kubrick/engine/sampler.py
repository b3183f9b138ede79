"""Pick the next token from logits: greedy at temperature 0, else temperature, top-k, top-p, with a seed.

Sampling runs on the CPU in fp32 with the request's own generator, so a seed gives the same tokens
whatever else the process is doing.
"""

from __future__ import annotations

import random

import torch

from kubrick.engine.api import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams):
        self.temperature = params.temperature
        self.top_k = params.top_k
        self.top_p = params.top_p
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed % 2**63)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] (any device) -> the next token id."""
        logits = logits.detach().float().cpu().reshape(-1)
        if self.temperature == 0:
            return int(torch.argmax(logits))  # first maximum on ties: deterministic
        logits = logits / self.temperature
        if 0 < self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)  # keep the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
