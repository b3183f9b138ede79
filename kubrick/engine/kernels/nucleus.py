"""The top-p cut of every row without sorting it: a radix select over the logits' bits, weighted by probability.

`kubrick.engine.sampler.cuts` (the reference) sorts each row, softmaxes it at the row's temperature and takes the
least logit whose inclusive running sum reaches top_p. On an H100 that sort of 201,088 logits a row takes 149 µs at
one row and 1.8 ms at 64 (a quarter of a 64-row decode step); the same logit is found here in ten passes over
the row, none of them a sort, in 47 µs and 0.48 ms (BENCHMARKS.md run 44):

  stats     each (row, split) program: the max and sum of exp((x - max) / T) of its part of the row, over the
            eligible logits (x >= the row's top-k bound, -inf when there is none).
  level L   (L = 0 … 7) the logits as 32-bit keys in the same order (sign flipped, negatives' magnitude bits
            flipped); each program sums the probability of its eligible logits whose top 4L bits equal the prefix
            chosen so far, per value of the next 4 bits (16 bins). The next launch sums the bins over the splits
            and, from the highest bin down, takes the first where the mass above the prefix plus the bins so far
            reaches top_p: that bin's digit joins the prefix. Every program of a row makes the same choice from the
            same sums; the first writes it down (prefix, mass above) for the launch after.
  cut       after the eighth digit the prefix is the key of the cut itself: the greatest logit v such that
            the probability of x >= v reaches top_p, which is the reference's cut. If rounding leaves top_p out
            of reach, the lowest digit present is taken at every level: the least eligible logit (all kept), as
            the reference does when its sum never reaches top_p.

The masses are summed in another order than the reference's cumulative sum, so where the running sum at a token
is within float32 rounding of top_p the two may pick neighbouring tokens. The launches' grid and unspecialised
arguments depend on the batch only through the grid: one compiled kernel pair serves every batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import num_sms, pdl, pdl_start

LEVELS = 8  # 4-bit digits of a 32-bit key
MAX_SPLITS = 128  # programs a row at most: each level's programs read all of their row's bins
LOG2E = tl.constexpr(1.4426950408889634)  # a kernel reads only constexpr globals


@triton.jit
def _key(x):
    """float32 -> int64 in [0, 2**32), ordered as the floats are."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negatives: larger magnitude, smaller key
    return ordered.to(tl.int64) + 2**31


@triton.jit
def _value(key):
    """The inverse of _key."""
    ordered = (key - 2**31).to(tl.int32)
    return tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["V", "SPLIT", "SPLITS"])
def _stats_kernel(logits_ptr, stride, temperature_ptr, floor_ptr, stats_ptr, V, SPLIT, SPLITS,
                  BLOCK: tl.constexpr, PDL: tl.constexpr):
    """(max, sum of exp2((x - max) * log2(e) / T)) over the eligible logits of one split of one row."""
    pdl_start(PDL)
    row, split = tl.program_id(0), tl.program_id(1)
    scale = LOG2E / tl.load(temperature_ptr + row)
    floor = tl.load(floor_ptr + row)
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(split * SPLIT, tl.minimum(split * SPLIT + SPLIT, V), BLOCK):
        ids = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + ids, mask=ids < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x >= floor, x, float("-inf"))
        new_top = tl.maximum(top, x)
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # no NaN from -inf - -inf
        total = total * tl.exp2((top - safe) * scale) + tl.exp2((x - safe) * scale)
        top = new_top
    m = tl.max(top, axis=0)
    safe_m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(top == float("-inf"), 0.0, total * tl.exp2((top - safe_m) * scale)), axis=0)
    tl.store(stats_ptr + (row * SPLITS + split) * 2, m)
    tl.store(stats_ptr + (row * SPLITS + split) * 2 + 1, s)


@triton.jit
def _row_stats(stats_ptr, row, SPLITS, scale, BLOCK_S: tl.constexpr):
    """The row's (max, sum) from its splits' stats."""
    s = tl.arange(0, BLOCK_S)
    tops = tl.load(stats_ptr + (row * SPLITS + s) * 2, mask=s < SPLITS, other=float("-inf"))
    sums = tl.load(stats_ptr + (row * SPLITS + s) * 2 + 1, mask=s < SPLITS, other=0.0)
    m = tl.max(tops, axis=0)
    return m, tl.sum(tl.where(tops == float("-inf"), 0.0, sums * tl.exp2((tops - m) * scale)), axis=0)


@triton.jit(do_not_specialize=["V", "SPLIT", "SPLITS", "LEVEL"])
def _level_kernel(logits_ptr, stride, temperature_ptr, floor_ptr, top_p_ptr, stats_ptr, bins_ptr, state_ptr,
                  above_ptr, cut_ptr, V, SPLIT, SPLITS, LEVEL, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                  PDL: tl.constexpr):
    """Choose digit LEVEL - 1 from the bins of launch LEVEL - 1 (LEVEL >= 1), then bin this split's eligible
    logits under the prefix by digit LEVEL (LEVEL < 8), or write the cut (LEVEL == 8, one program a row).

    bins [LEVELS, rows, SPLITS, 17]: 16 masses, then the lowest digit present (16 when none);
    state [LEVELS + 1, rows] (int64 prefix) and above [LEVELS + 1, rows] (the mass of keys above the prefix)."""
    pdl_start(PDL)
    row, split = tl.program_id(0), tl.program_id(1)
    rows = tl.num_programs(0)
    scale = LOG2E / tl.load(temperature_ptr + row)
    m, z = _row_stats(stats_ptr, row, SPLITS, scale, BLOCK_S)
    goal = tl.load(top_p_ptr + row) * z
    digits = tl.arange(0, 16)
    slot = tl.maximum(LEVEL - 1, 0)  # slot j: the prefix of j digits (slot 0: none, zeros)
    prefix = tl.load(state_ptr + slot * rows + row)
    above = tl.load(above_ptr + slot * rows + row)
    if LEVEL > 0:
        s = tl.arange(0, BLOCK_S)
        at = (((LEVEL - 1) * rows + row) * SPLITS + s) * 17
        binned = tl.sum(tl.load(bins_ptr + at[:, None] + digits[None, :], mask=(s < SPLITS)[:, None], other=0.0),
                        axis=0)
        present = tl.min(tl.load(bins_ptr + at + 16, mask=s < SPLITS, other=16.0), axis=0).to(tl.int32)
        # from_top[d]: the mass under the prefix with digit d … 15
        from_top = tl.sum(tl.where(digits[None, :] >= digits[:, None], binned[None, :], 0.0), axis=1)
        reached = tl.max(tl.where(above + from_top >= goal, digits, -1), axis=0)
        digit = tl.where(reached >= 0, reached, present)  # out of reach (rounding): the lowest digit present
        above += tl.sum(tl.where(digits > digit, binned, 0.0), axis=0)
        prefix = prefix | (digit.to(tl.int64) << (32 - 4 * LEVEL).to(tl.int64))
        if split == 0:
            tl.store(state_ptr + LEVEL * rows + row, prefix)
            tl.store(above_ptr + LEVEL * rows + row, above)
    if LEVEL == 8:
        tl.store(cut_ptr + row, _value(prefix))
    else:
        floor = tl.load(floor_ptr + row)
        shift = (28 - 4 * LEVEL).to(tl.int64)
        # [BLOCK, 1] columns from the load on: broadcast against the 16 digits without a change of layout
        mass = tl.zeros((BLOCK, 16), tl.float32)  # summed over the block's rows once, after the loop
        lowest = tl.full((BLOCK, 1), 16, tl.int32)
        bin_of = digits[None, :]
        for start in range(split * SPLIT, tl.minimum(split * SPLIT + SPLIT, V), BLOCK):
            ids = start + tl.arange(0, BLOCK)[:, None]
            x = tl.load(logits_ptr + row.to(tl.int64) * stride + ids, mask=ids < V, other=float("-inf")).to(tl.float32)
            key = _key(x)
            under = (ids < V) & (x >= floor) & ((key >> (shift + 4)) == (prefix >> (shift + 4)))
            if tl.max(tl.max(under.to(tl.int32), axis=1), axis=0) > 0:  # past the first levels most blocks hold none
                digit = ((key >> shift) & 15).to(tl.int32)
                p = tl.where(under, tl.exp2((x - m) * scale), 0.0)
                mass += tl.where(digit == bin_of, p, 0.0)
                lowest = tl.minimum(lowest, tl.where(under, digit, 16))
        out = bins_ptr + ((LEVEL * rows + row) * SPLITS + split) * 17
        tl.store(out + digits, tl.sum(mass, axis=0))
        tl.store(out + 16, tl.min(tl.min(lowest, axis=1), axis=0).to(tl.float32))


def top_p_cut(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, floor: torch.Tensor | None = None,
              block: int = 512, num_warps: int = 4) -> torch.Tensor:  # the best of --sweep-top-p on an H100
    """logits [R, V] (any float dtype, unit stride along V), temperature > 0 and top_p in (0, 1] float32 [R],
    floor float32 [R] (the top-k bound: only logits >= it count; None for none) -> float32 [R]: the least logit of
    each row's nucleus, as `kubrick.engine.sampler.cuts` computes it (the module docstring says how and where the
    two may differ). Nothing leaves the device."""
    rows, vocab = logits.shape
    assert logits.stride(-1) == 1 and temperature.dtype == top_p.dtype == torch.float32
    device = logits.device
    if floor is None:
        floor = torch.full((rows,), float("-inf"), device=device)
    pieces = max(1, min(triton.cdiv(8 * num_sms(device), rows), triton.cdiv(vocab, block), MAX_SPLITS))
    split = triton.cdiv(triton.cdiv(vocab, pieces), block) * block
    splits = triton.cdiv(vocab, split)
    block_s = min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(vocab, block)))  # not from the batch: one compile
    stats = torch.empty(rows, splits, 2, dtype=torch.float32, device=device)
    bins = torch.empty(LEVELS, rows, splits, 17, dtype=torch.float32, device=device)
    state = torch.zeros(LEVELS + 1, rows, dtype=torch.int64, device=device)
    above = torch.zeros(LEVELS + 1, rows, dtype=torch.float32, device=device)
    cut = torch.empty(rows, dtype=torch.float32, device=device)
    launch = pdl(device)
    _stats_kernel[(rows, splits)](logits, logits.stride(0), temperature, floor, stats, vocab, split, splits,
                                  BLOCK=block, **launch, num_warps=num_warps)
    for level in range(LEVELS + 1):
        grid = (rows, splits if level < LEVELS else 1)
        _level_kernel[grid](logits, logits.stride(0), temperature, floor, top_p, stats, bins, state, above, cut,
                            vocab, split, splits, level, BLOCK=block, BLOCK_S=block_s, **launch, num_warps=num_warps)
    return cut
