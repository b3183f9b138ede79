"""sm90's Gluon MoE (kernels/moe_wgmma.py): its K order on the CPU, its SASS offline, its numbers on an H100."""

import pytest
import torch

from kubrick.engine.kernels import reference
from kubrick.engine.kernels._common import block_config
from kubrick.engine.kernels.moe_grouped import moe_grouped
from kubrick.engine.kernels.moe_wgmma import dot_order, in_dot_order, moe_wgmma, packed_bases, true_k

from .helpers import random_moe, rel_error

# The bf16 A fragment of wgmma over [64 rows, 64 values] for 4 warps, as Triton 3.6 lays it out
# (gl.to_linear_layout(DotOperandLayout(0, NVMMADistributedLayout([3, 0], [4, 1], [16, 16, 16]), 2), [64, 64])).
DOT_64x64 = dict(reg=[[0, 1], [8, 0], [0, 8], [0, 16], [0, 32]], lane=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                 warp=[[16, 0], [32, 0]])


def _on_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("block_k", [64, 128])
def test_dot_order_is_a_permutation_of_each_tile_that_inverts_true_k(block_k):
    k = torch.arange(3 * block_k)
    order = dot_order(k, block_k)
    assert sorted(order.tolist()) == k.tolist()  # a permutation
    assert torch.equal(order // block_k, k // block_k)  # within each tile
    assert all(dot_order(torch.tensor(true_k(kl, block_k)), block_k).item() == kl for kl in range(block_k))
    x = (torch.arange(2 * 3 * block_k) * 10).reshape(2, 3 * block_k)
    assert torch.equal(in_dot_order(x, block_k)[:, order], x)  # true position k lands at dot position order[k]


def test_each_lane_reads_one_run_of_bytes_and_a_byte_gives_the_pair_8_apart():
    # The byte layout derived from the A fragment: a lane's bytes are consecutive (one vector load) and every
    # (row, byte) has exactly one owner; kl = 8 (the second code of a byte) is the nibble, not a byte.
    bases = packed_bases(DOT_64x64, 64)
    reg, lane, warp = bases["reg"], bases["lane"], bases["warp"]
    byte_regs = [b[1] for b in reg if b[0] == 0]
    assert byte_regs == [1, 2, 4]  # 8 consecutive bytes a row, first in register order
    owners = {}
    for r in range(2 ** len(reg)):
        for ln in range(32):
            for w in range(4):
                row = col = 0
                for bits, basis in ((r, reg), (ln, lane), (w, warp)):
                    for i, (dr, dc) in enumerate(basis):
                        if bits >> i & 1:
                            row ^= dr
                            col ^= dc
                owners.setdefault((row, col), []).append((r, ln, w))
    assert len(owners) == 64 * 32 and all(len(o) == 1 for o in owners.values())
    assert true_k(0, 64) + 1 == true_k(8, 64)  # a byte's two codes, at dot positions 8 apart


@pytest.mark.gpu
@pytest.mark.skipif(not _on_sm90(), reason="Gluon wgmma kernels: sm90 only")
@pytest.mark.parametrize("tokens,table", [(1, "moe_wgmma_small"), (13, "moe_wgmma_small"), (32, "moe_wgmma_small"),
                                          (1, "moe_wgmma"), (13, "moe_wgmma"), (64, "moe_wgmma"), (144, "moe_wgmma"),
                                          (145, "moe_wgmma_mid"), (600, "moe_wgmma_mid")])
def test_moe_wgmma_matches_reference_at_the_20b_shape(tokens, table):
    x, ids, weights, w = random_moe(tokens=tokens, hidden=2880, inter=2880, experts=32, topk=4,
                                    dtype=torch.bfloat16, device=torch.device("cuda"))
    expected = reference.moe(x, ids, weights, *w)
    out = moe_wgmma(x, ids, weights, *w, config=block_config(table, x.device))
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert rel_error(out, expected) < 1e-2
    stream = torch.randn(x.shape, device="cuda")
    before = stream.clone()
    assert moe_wgmma(x, ids, weights, *w, config=block_config(table, x.device), out=stream) is stream  # in place
    assert rel_error(stream, before + expected.float()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _on_sm90(), reason="Gluon wgmma kernels: sm90 only")
@pytest.mark.parametrize("block_m,block_n,sub,stages", [(16, 64, 1, 2), (8, 64, 3, 2), (64, 128, 1, 4), (32, 128, 3, 3)])
def test_moe_wgmma_with_partial_row_tiles_padded_pairs_and_other_blocks(block_m, block_n, sub, stages):
    # hidden 192 over 128-row tiles leaves mlp2 a partial tile (rows clamped, their outputs dropped); 20 tokens
    # over the experts leave padded pair slots; the residual is added.
    x, ids, weights, w = random_moe(tokens=20, hidden=192, inter=192, experts=4, topk=2, dtype=torch.bfloat16,
                                    device=torch.device("cuda"))
    residual = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, STAGES=stages, SUB=sub, num_warps=4)
    out = moe_wgmma(x, ids, weights, *w, config=config, residual=residual)
    assert rel_error(out, residual + reference.moe(x, ids, weights, *w)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _on_sm90(), reason="Gluon wgmma kernels: sm90 only")
def test_moe_grouped_hands_small_calls_to_moe_wgmma_on_sm90(monkeypatch):
    from kubrick.engine.kernels import moe_wgmma as module

    calls = []
    real = module.moe_wgmma
    monkeypatch.setattr(module, "moe_wgmma", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    for tokens in (16, 64, 200, 1100):  # 64, 256 and 800 pairs: Gluon (three tables); 4,400: the Triton tiles
        x, ids, weights, w = random_moe(tokens=tokens, hidden=2880, inter=2880, experts=32, topk=4,
                                        dtype=torch.bfloat16, device=torch.device("cuda"))
        assert rel_error(moe_grouped(x, ids, weights, *w), reference.moe(x, ids, weights, *w)) < 1e-2
    moe_grouped(x[:64], ids[:64], weights[:64], *w, config=dict(BLOCK_M=16))  # a config: the Triton tiles
    assert calls == [16, 64, 200]
