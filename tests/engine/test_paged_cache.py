"""The paged KV cache: block tables, prefix sharing by content, LRU eviction, exact accounting; and the batched
forward that reads it gives each sequence the numbers it gets alone."""

from __future__ import annotations

import pytest
import torch

from kubrick.engine.checkpoint import load_checkpoint
from kubrick.engine.model import Transformer
from kubrick.engine.paged_cache import BlockPool, CacheFull, chain_keys


@pytest.fixture(scope="module")
def model(tiny_original):
    config, weights = load_checkpoint(tiny_original)
    return Transformer(config, weights)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 199_998, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_block_pool_evicts_the_least_recently_used_cached_block_first():
    pool = BlockPool(3)
    a, b, _c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.set_key(a, b"a")
    pool.set_key(b, b"b")
    pool.release(a)
    pool.release(b)
    pool.acquire(a)  # a is used again: b is now the older one
    pool.release(a)
    assert pool.available() == 2
    assert pool.allocate() == b and pool.lookup(b"b") is None and pool.lookup(b"a") == a
    with pytest.raises(CacheFull):
        pool.allocate(), pool.allocate()


def test_equal_prefixes_get_equal_keys_and_a_changed_block_changes_every_later_key():
    one, two = tokens(48, 1), tokens(48, 1)
    two[20] += 1
    a, b = chain_keys(one, 16), chain_keys(two, 16)
    assert len(a) == 3 and a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
    assert chain_keys(one[16:], 16, a[0]) == a[1:]  # a chain continued block by block is the same chain


def test_batched_sequences_get_exactly_the_logits_they_get_alone(model):
    first, second = tokens(40, 3), tokens(25, 5)
    cache = model.new_paged_cache(64, 32, 16)
    seq = cache.admit(first, 48, 64)
    alone = model.forward_batch([(seq, first)], cache)
    alone_step = model.forward_batch([(seq, [5])], cache)

    cache = model.new_paged_cache(64, 32, 16)
    seq, other = cache.admit(first, 48, 64), cache.admit(second, 48, 64)
    model.forward_batch([(seq, first[:16]), (other, second)], cache)  # the prompt split over two steps
    together = model.forward_batch([(seq, first[16:]), (other, [9])], cache)
    together_step = model.forward_batch([(other, [7]), (seq, [5])], cache)
    assert torch.equal(together[0], alone[0]) and torch.equal(together_step[1], alone_step[0])


def test_the_paged_path_agrees_with_the_single_sequence_reference(model):
    ids = tokens(40, 3)  # 5 windows of 8: the window layers drop old blocks on the way
    cache = model.new_paged_cache(64, 32, 16)
    seq = cache.admit(ids, 48, 64)
    paged = model.forward_batch([(seq, ids)], cache)
    reference = model(torch.tensor(ids), model.new_cache(64))
    assert (paged - reference).abs().max() < 0.1 and paged.argmax() == reference.argmax()
    assert len(seq.window) <= 2  # only the blocks reaching into the last window are kept


def test_a_repeated_prompt_reuses_its_whole_prefill_blocks_with_identical_results(model):
    ids = tokens(40, 3)
    cache = model.new_paged_cache(64, 32, 16)
    seq = cache.admit(ids, 48, 64)
    cold = model.forward_batch([(seq, ids)], cache)
    cache.release(seq)
    assert cache.full_pool.referenced() == 0 and len(cache.full_pool.cached) == 2
    again = cache.admit(ids, 48, 64)
    assert again.reused == 32
    warm = model.forward_batch([(again, ids[32:])], cache)
    assert torch.equal(warm, cold)


def test_blocks_written_by_decode_steps_are_freed_not_cached(model):
    ids = tokens(20, 3)
    cache = model.new_paged_cache(64, 32, 16)
    seq = cache.admit(ids, 60, 64)
    model.forward_batch([(seq, ids)], cache)
    for token in range(30):
        model.forward_batch([(seq, [token])], cache)
    cache.release(seq)
    assert len(cache.full_pool.cached) == 1  # block 0, all prompt; blocks 1-3 hold decoded tokens
    assert cache.full_pool.available() == 64 and cache.usage() == 0


def test_admission_reserves_the_whole_reply_and_refuses_what_does_not_fit_now(model):
    cache = model.new_paged_cache(8, 32, 16)  # 128 positions
    first = cache.admit(tokens(20, 1), 100, 16)  # 7 blocks
    assert first is not None and cache.usage() == 7 / 8
    assert cache.admit(tokens(20, 2), 40, 16) is None  # 3 more blocks: not now
    assert cache.full_pool.available() - cache.outstanding()[0] == 1  # the refusal held nothing
    cache.release(first)
    assert cache.admit(tokens(20, 2), 40, 16) is not None
    assert not cache.fits_ever(129, 16) and cache.fits_ever(128, 16)
