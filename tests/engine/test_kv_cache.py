"""Incremental decoding through the KV cache gives what one pass over the whole sequence gives, also past
the sliding window and when a prompt is fed in chunks (as the engine does with long prompts).

Tolerance: the three ways differ only in matmul shapes, so some fp32 sums run in another order and a bf16
activation may land one rounding step away; logits are bf16 (as in gpt-oss), one step being 0.03 at their
size. So most positions agree to 0.05. A position may differ by more when that one-step change flips a
router near-tie and a token meets another expert; we allow that at a tenth of the positions at most.
A cache bug (wrong position, stale key, window off by one) moves most positions by tenths or more.
"""

from __future__ import annotations

import torch

from kubrick.engine.checkpoint import load_checkpoint
from kubrick.engine.model import Transformer


def test_one_pass_chunks_and_single_steps_agree(tiny_original):
    config, weights = load_checkpoint(tiny_original)
    model = Transformer(config, weights)
    ids = torch.randint(0, 199_998, (40,), generator=torch.Generator().manual_seed(3))  # 5x the window of 8

    whole = model(ids, model.new_cache(64), all_logits=True)
    cache = model.new_cache(64)
    chunked = torch.cat([model(chunk, cache, all_logits=True) for chunk in torch.split(ids, 7)])
    cache = model.new_cache(64)
    stepped = torch.cat([model(token.view(1), cache) for token in ids])

    assert cache.length == 40
    for other in (chunked, stepped):
        per_position = (other - whole).abs().amax(dim=-1)
        assert (per_position < 0.05).float().mean() >= 0.9, per_position
        assert (other - whole).abs().mean() < 0.005
        assert (other.argmax(-1) == whole.argmax(-1)).float().mean() >= 0.9


def test_truncating_the_cache_replays_exactly(tiny_original):
    config, weights = load_checkpoint(tiny_original)
    model = Transformer(config, weights)
    ids = torch.randint(0, 199_998, (20,), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(32)
    model(ids[:12], cache)
    first = model(ids[12:], cache)
    cache.truncate(12)
    assert torch.equal(model(ids[12:], cache), first)
    assert cache.usage() == 20 / 32
