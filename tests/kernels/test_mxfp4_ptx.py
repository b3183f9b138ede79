"""The MXFP4 decode's inline PTX (FAST_FP4, moe_wgmma) checked bit by bit on the CPU through a PTX emulator: CI has
no GPU, and a wrong mask or shift here would corrupt every MoE weight. The GPU test in test_mxfp4_moe.py runs the
same string on the hardware."""

import numpy as np
import torch

from kubrick.engine.kernels import reference
from kubrick.engine.kernels._common import _MXFP4_PTX

from . import ptx_emulator


def _multiplier_bits(scales: np.ndarray) -> np.ndarray:
    """mxfp4_scale_bf16 in numpy: E8M0 s -> the bf16 bits of 2**(s - 127 - 63) * 2**126."""
    return ((np.minimum(scales.astype(np.int64), 191) + 63) << 7).astype(np.uint32)


def _decode(packed: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and their scales (4 elements a call, as Triton packs them) -> (first codes, second codes) as floats."""
    words = packed.astype(np.uint32).reshape(-1, 4)
    word = words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16 | words[:, 3] << 24
    mult = _multiplier_bits(scales).reshape(-1, 4)
    first01, first23, second01, second23 = ptx_emulator.run(
        _MXFP4_PTX.value, [word, mult[:, 0] | mult[:, 1] << 16, mult[:, 2] | mult[:, 3] << 16], outputs=4)

    def halves(lo_pair, hi_pair):
        bits = np.stack([lo_pair & 0xFFFF, lo_pair >> 16, hi_pair & 0xFFFF, hi_pair >> 16], axis=1).reshape(-1)
        return (bits.astype(np.uint32) << 16).view(np.float32)

    return halves(first01, first23), halves(second01, second23)


def test_decode_ptx_is_exact_for_every_byte_and_scale():
    # Every byte against every scale from 2**-63 to 2**64: 2**-63 times the reference value, bit for bit.
    scales = np.repeat(np.arange(64, 192, dtype=np.uint8), 256)
    packed = np.tile(np.arange(256, dtype=np.uint8), 128)
    first, second = _decode(packed, scales)
    expected = reference.dequant_mxfp4(torch.from_numpy(packed).view(-1, 1, 16),
                                       torch.from_numpy(scales).view(-1, 16)[:, :1].contiguous()).view(-1, 2)
    np.testing.assert_array_equal(first, (expected[:, 0] * 2.0**-63).numpy())
    np.testing.assert_array_equal(second, (expected[:, 1] * 2.0**-63).numpy())
    # the sign of zero too: 0x88 is -0 twice
    assert np.signbit(first[packed == 0x88]).all() and not np.signbit(first[packed == 0x00]).any()


def test_decode_ptx_keeps_each_byte_to_its_own_codes():
    # Neighbouring bytes must not leak into each other's bits: every pair of bytes side by side, both orders.
    pairs = np.arange(65536, dtype=np.uint32)
    packed = np.stack([pairs & 0xFF, pairs >> 8, pairs >> 8, pairs & 0xFF], axis=1).astype(np.uint8).reshape(-1)
    scales = np.full(packed.shape, 127, dtype=np.uint8)
    first, second = _decode(packed, scales)
    alone_first, alone_second = _decode(np.arange(256, dtype=np.uint8).repeat(4), np.full(1024, 127, np.uint8))
    np.testing.assert_array_equal(first, alone_first[::4][packed])
    np.testing.assert_array_equal(second, alone_second[::4][packed])
