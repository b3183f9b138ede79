"""The MXFP4 MoE kernels (decode GEMV and grouped prefill) against kernels.reference.moe."""

import pytest
import torch

from kubrick.engine.kernels import reference
from kubrick.engine.kernels.moe_gemv import gemv_layout, moe_gemv
from kubrick.engine.kernels.moe_grouped import group_by_expert, moe_grouped

from .helpers import random_moe, rel_error


def test_reference_dequant_matches_the_format():
    # byte 0x21: low nibble 1 (+0.5) first, high nibble 2 (+1.0); byte 0xF8: -0 then -6; scale 128 doubles.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[0, 0, 1] = 0x21, 0xF8
    scales = torch.tensor([[128]], dtype=torch.uint8)
    values = reference.dequant_mxfp4(blocks, scales)
    assert values.shape == (1, 32)
    assert values[0, :4].tolist() == [1.0, 2.0, -0.0, -12.0]


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("split_k", [1, 2])
def test_moe_gemv_matches_reference(device, dtype, bound, split_k):
    # inter 96 is 1.5 K steps of 64 values: every row block also takes the masked tail step.
    x, ids, weights, w = random_moe(tokens=3, hidden=64, inter=96, experts=4, topk=2, dtype=dtype, device=device)
    out = moe_gemv(x, ids, weights, *w, split_k=split_k)
    expected = reference.moe(x, ids, weights, *w)
    assert out.shape == expected.shape and out.dtype == dtype
    assert rel_error(out, expected) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_moe_gemv_adds_the_residual(device, dtype, split_k):
    x, ids, weights, w = random_moe(tokens=3, hidden=64, inter=96, experts=4, topk=2, dtype=dtype, device=device)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    kept = residual.clone()
    out = moe_gemv(x, ids, weights, *w, split_k=split_k, residual=residual)
    assert torch.equal(residual, kept)  # the residual is read, never written
    assert rel_error(out, residual + reference.moe(x, ids, weights, *w)) < (1e-4 if dtype == torch.float32 else 1e-2)


def test_moe_gemv_with_row_blocks_past_the_end(device):
    # hidden 96 over blocks of 64 rows (mlp2) and 2 * 96 rows over blocks of 128 (mlp1): masked rows.
    x, ids, weights, w = random_moe(tokens=2, hidden=96, inter=96, experts=4, topk=2, dtype=torch.float32,
                                    device=device)
    out = moe_gemv(x, ids, weights, *w, config=dict(BLOCK_I=64, BLOCK_N=64))
    assert rel_error(out, reference.moe(x, ids, weights, *w)) < 1e-4


def test_moe_gemv_takes_activations_already_in_gemv_layout(device):
    x, ids, weights, w = random_moe(tokens=2, hidden=64, inter=96, experts=4, topk=2, dtype=torch.bfloat16,
                                    device=device)
    x_gemv = gemv_layout(x)
    assert x_gemv.shape == (2, 8, 8) and x_gemv[1, 3, 5] == x[1, 8 * 5 + 3].float() * 2.0**64
    torch.testing.assert_close(moe_gemv(x, ids, weights, *w, x_gemv=x_gemv), moe_gemv(x, ids, weights, *w))


def test_group_by_expert_covers_every_pair_once_in_single_expert_tiles(device):
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3], [2, 0]], dtype=torch.int32, device=device)
    pair_ids, tile_expert = group_by_expert(ids, n_experts=5, block_m=2)
    tiles = pair_ids.view(-1, 2).cpu()
    real = tiles[tiles >= 0]
    assert sorted(real.tolist()) == list(range(10))
    flat = ids.flatten().cpu()
    for tile, expert in zip(tiles.tolist(), tile_expert.cpu().tolist()):
        members = [p for p in tile if p >= 0]
        assert (expert == -1) == (not members)
        assert all(flat[p] == expert for p in members)


@pytest.mark.parametrize("tokens,topk,experts,block_m", [(500, 4, 5, 16), (7, 4, 32, 64), (64, 4, 32, 16)])
def test_group_by_expert_is_the_stable_sort_of_the_reference(device, tokens, topk, experts, block_m):
    # 2000 pairs span several of the kernel's chunks; 5 experts is no power of two.
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, topk), generator=gen, dtype=torch.int32).to(device)
    got = group_by_expert(ids, experts, block_m)
    expected = reference.group_by_expert(ids, experts, block_m)
    assert all(torch.equal(g.cpu(), e.cpu()) for g, e in zip(got, expected))


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_moe_grouped_matches_reference(device, dtype, bound):
    x, ids, weights, w = random_moe(tokens=20, hidden=64, inter=96, experts=4, topk=2, dtype=dtype, device=device)
    out = moe_grouped(x, ids, weights, *w, config=dict(DOT_SCALED=False))
    expected = reference.moe(x, ids, weights, *w)
    assert out.dtype == dtype
    assert rel_error(out, expected) < bound


@pytest.mark.gpu  # the CPU interpreter of Triton 3.6 has no dot_scaled
@pytest.mark.parametrize("tokens,block_m", [(20, 16), (300, 128)])
def test_moe_grouped_on_dot_scaled_matches_reference(device, tokens, block_m):
    # bf16 activations, MXFP4 weights as stored; dot_scaled's bf16 operands land where the tl.dot path does.
    x, ids, weights, w = random_moe(tokens=tokens, hidden=256, inter=192, experts=8, topk=4, dtype=torch.bfloat16,
                                    device=device)
    out = moe_grouped(x, ids, weights, *w, config=dict(DOT_SCALED=True, BLOCK_M=block_m))
    assert rel_error(out, reference.moe(x, ids, weights, *w)) < 1e-2
