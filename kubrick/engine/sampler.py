"""Pick the next token from logits: greedy at temperature 0, else temperature, top-k, top-p, with a seed.

Sampling runs in fp32 on the device that holds the logits, with the request's own generator there, so a seed
gives the same tokens on the same device whatever else the process is doing. Only the chosen id crosses to the
host: copying 201,088 logits to the CPU every token cost the GPU engine a third of its decode speed.
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
        self.seed = (params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)) % 2**63
        self.generator: torch.Generator | None = None  # made on the logits' device at the first draw

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] (any device) -> the next token id."""
        logits = logits.detach().reshape(-1)
        if self.temperature == 0:
            return int(torch.argmax(logits))  # first maximum on ties: deterministic
        logits = logits.float()
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
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
