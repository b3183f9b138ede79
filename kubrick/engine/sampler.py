"""Pick the next token from logits: greedy at temperature 0, else temperature, top-k, top-p, with a seed.

`sample_rows` picks for every row of a step at once, on the device that holds the logits: on a GPU, one Triton
kernel (kernels/sampling.py) after, for rows with a top-k or top-p cut, torch.topk and a radix select of the top-p
bound (kernels/nucleus.py; no sort); only the chosen ids cross to the host, in one copy, and the scheduler can feed
them to the next step without reading them first. On the CPU the cut comes from `cuts`, which sorts.

Every draw is the Gumbel-max trick, argmax_i (x_i / T + g_i), with the uniforms behind g keyed by the request's
seed and its draw count: a seed gives the same tokens whatever else the batch holds (on one device; the GPU's
Philox and the CPU's generator give different streams).
"""

from __future__ import annotations

import random

import torch

from kubrick.engine.api import SamplingParams
from kubrick.engine.cuda_graphs import on_device

_MASK63 = (1 << 63) - 1


def _draw_key(seed: int, draw: int) -> int:
    """A 63-bit key for draw number `draw` of a request seeded `seed` (splitmix64's finaliser)."""
    z = (seed + (draw + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK63


class Sampler:
    """One request's sampling settings, its seed and how many tokens it has drawn."""

    def __init__(self, params: SamplingParams):
        self.temperature = params.temperature
        self.top_k = params.top_k
        self.top_p = params.top_p
        self.seed = (params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)) % 2**63
        self.draws = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def next_key(self) -> int:
        key = _draw_key(self.seed, self.draws)
        self.draws += 1
        return key

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] (any device) -> the next token id."""
        return int(sample_rows(logits.detach().reshape(1, -1), [self])[0])


# A temperature this small already draws the argmax; below it x / T could overflow float32 into ties at +inf.
MIN_TEMPERATURE = 1e-6


def sample_rows(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    """logits [B, vocab], one sampler per row -> the picked ids, int64 [B] on the logits' device (not synced)."""
    if all(s.greedy for s in samplers):
        return logits.argmax(-1)  # first maximum on ties, as the draws below
    device, vocab = logits.device, logits.shape[1]
    temperatures = [0.0 if s.greedy else max(s.temperature, MIN_TEMPERATURE) for s in samplers]
    temperature = on_device(temperatures, device, torch.float32)
    keys = on_device([0 if s.greedy else s.next_key() for s in samplers], device, torch.int64)
    cut = torch.full((len(samplers),), float("-inf"), device=device)
    narrowed = [i for i, s in enumerate(samplers) if not s.greedy and (s.top_p < 1.0 or 0 < s.top_k < vocab)]
    if narrowed:
        rows = on_device(narrowed, device, torch.int64)
        top_ks = [samplers[i].top_k if 0 < samplers[i].top_k < vocab else vocab for i in narrowed]
        top_ps = [samplers[i].top_p for i in narrowed]
        settings = on_device([[temperatures[i] for i in narrowed], top_ks, top_ps], device, torch.float32)
        if device.type == "cuda":  # no sort of whole rows (~2 ms at 64 rows): a top-k, then a radix select
            every = len(narrowed) == len(samplers)  # then no copy of the rows
            cut[rows] = _cuts_on_gpu(logits if every else logits[rows], settings, top_ks, top_ps)
        else:
            cut[rows] = cuts(logits[rows], *settings)
    if device.type == "cuda":
        from kubrick.engine.kernels.sampling import sample  # Triton: compiled only where there is a GPU

        return sample(logits, temperature, cut, keys)
    return _sample_torch(logits, temperature, cut, keys.tolist())


def cuts(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [R, vocab], per row: temperature > 0, top_k in 1 … vocab, top_p in (0, 1] -> the least logit each row
    keeps: its top_k most likely tokens (ties with the k-th kept), then the smallest set of those whose
    probabilities at its temperature reach top_p (none dropped at top_p = 1). Ties at the cut are kept.

    A cut on the logits themselves, not on x / T, so that the kernel compares the very values it loads."""
    ordered = logits.float().sort(dim=-1, descending=True).values
    kth = ordered.gather(1, (top_k.long() - 1)[:, None])
    inside = ordered >= kth
    probs = torch.softmax((ordered / temperature[:, None]).masked_fill(~inside, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    kept = (inside & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))).sum(-1).clamp(min=1)
    return ordered.gather(1, (kept - 1)[:, None]).squeeze(1)


def _cuts_on_gpu(logits: torch.Tensor, settings: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """What `cuts` computes, without sorting whole rows: each row's top-k bound from one torch.topk (of the
    largest k asked for below the vocabulary), then the top-p cut by kernels/nucleus.py over the logits at or
    above that bound."""
    from kubrick.engine.kernels.nucleus import top_p_cut  # Triton: compiled only where there is a GPU

    temperature, top_k, top_p = settings
    vocab = logits.shape[1]
    floor = None
    if min(top_ks) < vocab:
        k = max(k for k in top_ks if k < vocab)
        largest = logits.topk(k, dim=-1).values.float()  # [rows, the largest k asked for]
        kth = largest.gather(1, (top_k.long() - 1).clamp(max=largest.shape[1] - 1)[:, None]).squeeze(1)
        floor = torch.where(top_k < vocab, kth, float("-inf"))
    if min(top_ps) >= 1.0:  # top-k only
        return floor
    cut = top_p_cut(logits, temperature.contiguous(), top_p.contiguous(), floor)
    return cut if floor is None else torch.where(top_p >= 1.0, floor, cut)


def _sample_torch(logits: torch.Tensor, temperature: torch.Tensor, cut: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """What the kernel computes, with torch on the CPU: the uniforms come from a generator seeded by each key."""
    x = logits.float()
    picks = []
    for row, key in enumerate(keys):
        t = float(temperature[row])
        if t == 0:
            picks.append(x[row].argmax())
            continue
        u = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(key))
        score = torch.where(x[row] >= cut[row], x[row] / t - torch.log(-torch.log(u)), float("-inf"))
        picks.append(score.argmax())
    return torch.stack(picks)

