"""On-GPU sampling: the next token of every row of a step, with only the ids leaving the device.

A row with temperature T > 0 is drawn by the Gumbel-max trick: argmax_i (x_i / T + g_i), with g_i = -log(-log u_i)
and u_i uniform in [0, 1), is a draw from softmax(x / T). Tokens whose logit is below the row's cut (its top-k /
top-p bound, from `kubrick.engine.sampler.cuts`) are left out. A row with T = 0 takes argmax_i x_i (greedy).
Ties go to the lowest id, as torch.argmax gives them.

u_i is Philox's (tl.rand4x) at counter i // 4 under the row's key: a request's draws depend on its seed and on how
many it has drawn, not on the rows beside it or on any generator's state.

Two launches: each (row, split) program scans a split of the vocabulary (splits spread a few rows over every
SM: at one row, one program would run the Philox rounds of all 201,088 ids alone, an estimated tens of us); one
program per row then takes the best of its splits. Batch sizes change only the grid and two unspecialised
arguments: one compiled pair of kernels serves every batch of a model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import num_sms, pdl, pdl_start


# Sizes that change with the batch are unspecialised: one compiled kernel serves every batch (a compile mid-serving
# would stall every stream for ~0.5 s).
@triton.jit(do_not_specialize=["V", "SPLIT", "SPLITS"])
def _split_best_kernel(logits_ptr, stride, temperature_ptr, cut_ptr, key_ptr, best_ptr, best_id_ptr, V, SPLIT, SPLITS,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The best (score, id) of one split of one row; a lane keeps its first id on ties (strict >)."""
    pdl_start(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    t = tl.load(temperature_ptr + row)
    cut = tl.load(cut_ptr + row)
    key = tl.load(key_ptr + row)
    sampled = t > 0.0
    t = tl.where(sampled, t, 1.0)
    quad = tl.arange(0, BLOCK // 4)[:, None]
    lane = tl.arange(0, 4)[None, :]
    best = tl.full((BLOCK // 4, 4), float("-inf"), tl.float32)
    best_id = tl.zeros((BLOCK // 4, 4), dtype=tl.int32)
    for start in range(split * SPLIT, tl.minimum(split * SPLIT + SPLIT, V), BLOCK):
        ids = start + 4 * quad + lane  # [BLOCK/4, 4]: one Philox call gives the 4 ids of a row of this tile
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + ids, mask=ids < V, other=float("-inf")).to(tl.float32)
        u0, u1, u2, u3 = tl.rand4x(key, start // 4 + tl.arange(0, BLOCK // 4))
        u = tl.where(lane == 0, u0[:, None], tl.where(lane == 1, u1[:, None], tl.where(lane == 2, u2[:, None], u3[:, None])))
        drawn = tl.where(x >= cut, x / t - tl.log(-tl.log(u)), float("-inf"))
        score = tl.where(sampled, drawn, x)
        better = score > best
        best = tl.where(better, score, best)
        best_id = tl.where(better, ids, best_id)
    top = tl.max(tl.max(best, axis=1), axis=0)
    first = tl.min(tl.min(tl.where(best == top, best_id, V), axis=1), axis=0)
    tl.store(best_ptr + row * SPLITS + split, top)
    tl.store(best_id_ptr + row * SPLITS + split, first)


@triton.jit(do_not_specialize=["SPLITS"])
def _combine_kernel(best_ptr, best_id_ptr, out_ptr, SPLITS, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """A row's pick: the best of its splits, the lowest id among equal bests."""
    pdl_start(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    best = tl.load(best_ptr + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    ids = tl.load(best_id_ptr + row * SPLITS + s, mask=s < SPLITS, other=2**31 - 1)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, ids, 2**31 - 1), axis=0))


def sample(logits: torch.Tensor, temperature: torch.Tensor, cut: torch.Tensor, key: torch.Tensor,
           block: int = 1024) -> torch.Tensor:
    """logits [B, V] (any float dtype; rows may be strided, e.g. the first V columns of a padded vocabulary),
    temperature and cut float32 [B], key int64 [B] -> the picked ids, int64 [B] on the logits' device."""
    rows, vocab = logits.shape
    assert logits.stride(-1) == 1 and temperature.dtype == cut.dtype == torch.float32 and key.dtype == torch.int64
    # ~16 programs an SM, not 2: the Philox rounds and logs keep each busy (64 rows: 108.8 -> 77.7 us, run 44)
    pieces = max(1, min(triton.cdiv(16 * num_sms(logits.device), rows), triton.cdiv(vocab, block)))
    split = triton.cdiv(triton.cdiv(vocab, pieces), block) * block  # whole blocks, so Philox counters line up
    splits = triton.cdiv(vocab, split)
    best = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    best_id = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    _split_best_kernel[(rows, splits)](logits, logits.stride(0), temperature, cut, key, best, best_id, vocab,
                                       split, splits, BLOCK=block, **pdl(logits.device), num_warps=4)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    # BLOCK_S from the vocabulary alone (splits never exceed its blocks): no new compile for a new batch size.
    block_s = triton.next_power_of_2(triton.cdiv(vocab, block))
    _combine_kernel[(rows,)](best, best_id, out, splits, BLOCK_S=block_s, **pdl(logits.device), num_warps=1)
    return out
