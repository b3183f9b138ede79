"""The MXFP4 MoE kernels (decode GEMV and grouped prefill) against kernels.reference.moe."""

import pytest
import torch
import triton
import triton.language as tl

from kubrick.engine.kernels import reference
from kubrick.engine.kernels._common import mxfp4_scale_bf16, mxfp4_to_bf16
from kubrick.engine.kernels.moe_gemv import gemv_input, moe_gemv, word_dot_f16
from kubrick.engine.kernels.moe_grouped import group_by_expert, moe_grouped

from .helpers import from_gemv_input, random_moe, rel_error


@triton.jit
def _decode_bytes_kernel(packed_ptr, scale_ptr, low_ptr, high_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    low, high = mxfp4_to_bf16(tl.load(packed_ptr + offs), mxfp4_scale_bf16(tl.load(scale_ptr + offs)))
    tl.store(low_ptr + offs, low)
    tl.store(high_ptr + offs, high)


@pytest.mark.gpu  # inline PTX: the CPU interpreter cannot run it
def test_fast_fp4_decode_is_exact_for_every_byte_and_scale():
    # Every byte against every scale from 2**-63 to 2**64: bf16 2**-63 times the reference value, exactly.
    scales = torch.arange(64, 192, dtype=torch.uint8).repeat_interleave(256)
    packed = torch.arange(256, dtype=torch.uint8).repeat(128)
    low, high = (torch.empty(packed.numel(), dtype=torch.bfloat16, device="cuda") for _ in range(2))
    _decode_bytes_kernel[(packed.numel() // 1024,)](packed.cuda(), scales.cuda(), low, high, BLOCK=1024)
    expected = reference.dequant_mxfp4(packed.view(-1, 1, 16), scales.view(-1, 16)[:, :1].contiguous()).view(-1, 2)
    torch.testing.assert_close(low.cpu().float(), expected[:, 0] * 2.0**-63, rtol=0, atol=0)
    torch.testing.assert_close(high.cpu().float(), expected[:, 1] * 2.0**-63, rtol=0, atol=0)


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


def test_moe_gemv_sums_into_a_float32_stream_in_place(device):
    # As the grouped kernel does (below): at decode too the residual stream between layers is float32.
    x, ids, weights, w = random_moe(tokens=2, hidden=64, inter=96, experts=4, topk=2, dtype=torch.bfloat16,
                                    device=device)
    stream = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(device)
    before = stream.clone()
    out = moe_gemv(x, ids, weights, *w, out=stream)
    assert out is stream and out.dtype == torch.float32
    assert rel_error(out, before + reference.moe(x, ids, weights, *w).float()) < 1e-2
    with pytest.raises(AssertionError):  # a bf16 buffer would silently round the sums
        moe_gemv(x, ids, weights, *w, out=torch.zeros_like(x))


def test_moe_gemv_with_row_blocks_past_the_end(device):
    # hidden 96 over blocks of 64 rows (mlp2) and 2 * 96 rows over blocks of 128 (mlp1): masked rows.
    x, ids, weights, w = random_moe(tokens=2, hidden=96, inter=96, experts=4, topk=2, dtype=torch.float32,
                                    device=device)
    out = moe_gemv(x, ids, weights, *w, config=dict(BLOCK_I=64, BLOCK_N=64))
    assert rel_error(out, reference.moe(x, ids, weights, *w)) < 1e-4


def test_moe_gemv_takes_activations_already_in_gemv_layout(device):
    x, ids, weights, w = random_moe(tokens=2, hidden=64, inter=96, experts=4, topk=2, dtype=torch.bfloat16,
                                    device=device)
    x_gemv = gemv_input(x)
    assert x_gemv.data[1, 3, 5].item() != 0
    assert torch.equal(from_gemv_input(x_gemv), x.float())
    torch.testing.assert_close(moe_gemv(x, ids, weights, *w, x_gemv=x_gemv), moe_gemv(x, ids, weights, *w))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_half_layout_holds_bf16_activations_exactly_at_any_magnitude(device, scale):
    # The half layout (fp16 pairs times a power of two per token) is written by plain Triton, so the CPU
    # interpreter checks it too; its largest value lands in [2**13, 2**14], where sums of 8 products stay in fp16.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 64, generator=gen) * scale).to(device=device, dtype=torch.bfloat16)
    x[2] = 0  # an all-zero row must not give an infinite factor
    g = gemv_input(x, config=dict(HALF=True))
    assert g.half and g.data.shape == (3, 4, 8)
    assert torch.equal(from_gemv_input(g), x.float())
    largest = g.data.view(torch.float16).float().abs().amax(dim=(1, 2))
    assert ((largest[:2] >= 2**13) & (largest[:2] <= 2**14)).all() and largest[2] == 0


def test_kubrick_gemv_half_off_keeps_the_float32_layout(device, monkeypatch):
    x = torch.randn(2, 64).to(device=device, dtype=torch.bfloat16)
    assert gemv_input(x, config=dict(HALF=True)).half
    monkeypatch.setenv("KUBRICK_GEMV_HALF", "off")
    g = gemv_input(x, config=dict(HALF=True))
    assert not g.half and g.data.dtype == torch.float32 and torch.equal(from_gemv_input(g), x.float())


@triton.jit
def _word_dot_kernel(w_ptr, x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x0, x1 = tl.load(x_ptr + offs * 4), tl.load(x_ptr + offs * 4 + 1)
    x2, x3 = tl.load(x_ptr + offs * 4 + 2), tl.load(x_ptr + offs * 4 + 3)
    tl.store(out_ptr + offs, word_dot_f16(tl.load(w_ptr + offs), x0, x1, x2, x3))


@pytest.mark.gpu  # inline PTX: the CPU interpreter cannot run it
def test_word_dot_f16_sums_every_code_exactly():
    # Every code in every nibble, against activations that keep the 8-product sums exact in fp16: the word's
    # sum of code * x must come out as the reference's, times 2**-14, with no rounding at all.
    gen = torch.Generator().manual_seed(4)
    words = torch.randint(0, 2**32, (4096,), generator=gen, dtype=torch.int64)
    words[:16] = torch.tensor([0x11111111 * n for n in range(16)])  # each code in all 8 nibbles
    codes = reference.dequant_mxfp4(words.to(torch.int32).view(torch.uint8).view(-1, 1, 4),
                                    torch.full((4096, 1), 127, dtype=torch.uint8)).view(-1, 8)
    # Sums stay exact: small x are multiples of 64 up to 512 (sums are multiples of 2**-9 below 2), large ones
    # +-2**14, the half layout's largest (sums of multiples of 0.5 up to 48).
    small = torch.randint(-8, 9, (2048, 8), generator=gen) * 64
    large = torch.randint(-1, 2, (2048, 8), generator=gen) * 2**14
    x = torch.cat([small, large]).float()
    expected = (codes * x).sum(dim=1) * 2.0**-14
    pairs = torch.stack([x[:, :4], x[:, 4:]], dim=-1).to(torch.float16).contiguous().view(torch.int32).view(-1, 4)
    out = torch.empty(4096, device="cuda")
    _word_dot_kernel[(4,)](words.to(torch.int32).cuda(), pairs.cuda(), out, BLOCK=1024)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


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


@pytest.mark.gpu  # the interpreter compiles nothing
def test_group_by_expert_compiles_once_for_every_token_count():
    # A serving step's token count changes every step; a compile mid-serving stalls every stream ~0.5 s.
    from kubrick.engine.kernels.moe_grouped import _group_by_expert_kernel

    from kubrick.engine.kernels.moe_grouped import _count_per_chunk_kernel, _place_chunk_kernel

    def variants():
        device = torch.cuda.current_device()
        return [len(k.device_caches[device][0]) for k in (_group_by_expert_kernel, _count_per_chunk_kernel,
                                                           _place_chunk_kernel)]

    compiled = []
    for tokens in (1, 16, 17, 64, 333, 512, 257, 300, 511):  # 1,028-2,044 pairs: the split path, 16 chunks
        ids = torch.randint(0, 32, (tokens, 4), dtype=torch.int32, device="cuda")
        got = group_by_expert(ids, 32, 16)
        assert all(torch.equal(g.cpu(), e.cpu()) for g, e in zip(got, reference.group_by_expert(ids, 32, 16)))
        compiled.append(variants())
    assert compiled[1:4] == compiled[:3] and compiled[5:] == compiled[4:-1], compiled  # none new after the first


@pytest.mark.parametrize("tokens,topk,experts,block_m", [(500, 4, 5, 16), (7, 4, 32, 64), (64, 4, 32, 16),
                                                          (700, 4, 32, 64), (1100, 4, 32, 16)])
def test_group_by_expert_is_the_stable_sort_of_the_reference(device, tokens, topk, experts, block_m):
    # 2000 pairs span several of the kernel's chunks; 5 experts is no power of two. Above SPLIT_PAIRS (1024) a
    # program per chunk counts and another places: 2,800 pairs in 32 chunks of 128 (10 of them empty), 4,400 in 64.
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, topk), generator=gen, dtype=torch.int32).to(device)
    got = group_by_expert(ids, experts, block_m)
    expected = reference.group_by_expert(ids, experts, block_m)
    assert all(torch.equal(g.cpu(), e.cpu()) for g, e in zip(got, expected))


def test_group_by_expert_in_chunks_or_one_program_agree(device):
    # The same 800 pairs through the chunked path (counts a chunk, then places) and through one program.
    ids = torch.randint(0, 5, (200, 4), generator=torch.Generator().manual_seed(3), dtype=torch.int32).to(device)
    expected = reference.group_by_expert(ids, 5, 16)
    for split_pairs in (128, 1 << 30):
        got = group_by_expert(ids, 5, 16, split_pairs=split_pairs)
        assert all(torch.equal(g.cpu(), e.cpu()) for g, e in zip(got, expected)), split_pairs


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_moe_grouped_matches_reference(device, dtype, bound):
    x, ids, weights, w = random_moe(tokens=20, hidden=64, inter=96, experts=4, topk=2, dtype=dtype, device=device)
    out = moe_grouped(x, ids, weights, *w, config=dict(DOT_SCALED=False))
    expected = reference.moe(x, ids, weights, *w)
    assert out.dtype == dtype
    assert rel_error(out, expected) < bound


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("block_n", [32, 64])
def test_moe_grouped_with_gate_and_linear_rows_in_one_dot(device, dtype, bound, block_n):
    # ONE_DOT: rows 2i, 2i+1 as one block, the accumulator split after; inter 96 over 64 leaves a masked block.
    x, ids, weights, w = random_moe(tokens=20, hidden=64, inter=96, experts=4, topk=2, dtype=dtype, device=device)
    out = moe_grouped(x, ids, weights, *w, config=dict(DOT_SCALED=False, ONE_DOT=True, BLOCK_N=block_n))
    assert rel_error(out, reference.moe(x, ids, weights, *w)) < bound


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_moe_grouped_with_the_weights_as_the_first_operand(device, dtype, bound):
    # W_FIRST: W @ x^T summed transposed; hidden 96 over a 64-value step and inter 96 over 64 rows leave masked
    # steps and blocks, 20 tokens over 16-pair tiles leave padded tiles.
    x, ids, weights, w = random_moe(tokens=20, hidden=96, inter=96, experts=4, topk=2, dtype=dtype, device=device)
    config = dict(DOT_SCALED=False, W_FIRST=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, MLP2=dict(BLOCK_N=64))
    out = moe_grouped(x, ids, weights, *w, config=config)
    assert rel_error(out, reference.moe(x, ids, weights, *w)) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_grouped_adds_the_residual_and_takes_its_own_mlp2_tile(device, dtype):
    x, ids, weights, w = random_moe(tokens=20, hidden=96, inter=64, experts=4, topk=2, dtype=dtype, device=device)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)
    kept = residual.clone()
    config = dict(DOT_SCALED=False, MLP2=dict(BLOCK_N=64, BLOCK_K=32))  # hidden 96 over 64 rows: a masked block
    out = moe_grouped(x, ids, weights, *w, config=config, residual=residual)
    assert torch.equal(residual, kept)  # read, never written
    assert rel_error(out, residual + reference.moe(x, ids, weights, *w)) < (1e-4 if dtype == torch.float32 else 1e-2)


def test_moe_grouped_sums_into_a_float32_stream_in_place(device):
    # out: the float32 residual stream between layers; the block is added into it and it comes back, no copy.
    x, ids, weights, w = random_moe(tokens=20, hidden=64, inter=96, experts=4, topk=2, dtype=torch.bfloat16,
                                    device=device)
    stream = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(device)
    before = stream.clone()
    out = moe_grouped(x, ids, weights, *w, config=dict(DOT_SCALED=False), out=stream)
    assert out is stream and out.dtype == torch.float32
    assert rel_error(out, before + reference.moe(x, ids, weights, *w).float()) < 1e-2
    with pytest.raises(AssertionError):  # a bf16 buffer would silently round the sums
        moe_grouped(x, ids, weights, *w, out=torch.zeros_like(x))


@pytest.mark.gpu  # the CPU interpreter of Triton 3.6 has no dot_scaled
@pytest.mark.parametrize("tokens,block_m", [(20, 16), (300, 128)])
def test_moe_grouped_on_dot_scaled_and_fast_fp4_match_reference(device, tokens, block_m):
    # bf16 activations, MXFP4 weights as stored; dot_scaled's bf16 operands land where the tl.dot path does.
    x, ids, weights, w = random_moe(tokens=tokens, hidden=256, inter=192, experts=8, topk=4, dtype=torch.bfloat16,
                                    device=device)
    expected = reference.moe(x, ids, weights, *w)
    out = moe_grouped(x, ids, weights, *w, config=dict(DOT_SCALED=True, BLOCK_M=block_m))
    assert rel_error(out, expected) < 1e-2
    out = moe_grouped(x, ids, weights, *w, config=dict(DOT_SCALED=False, FAST_FP4=True, BLOCK_M=block_m))
    assert rel_error(out, expected) < 1e-2  # the inline-PTX decode (FAST_FP4) on the tl.dot path
    out = moe_grouped(x, ids, weights, *w, config=dict(DOT_SCALED=False, FAST_FP4=True, W_FIRST=True,
                                                       BLOCK_M=block_m, BLOCK_N=64, num_warps=4))
    assert rel_error(out, expected) < 1e-2  # the same, the weights as wgmma's register operand
