"""MXFP4 (OCP microscaling FP4) as gpt-oss stores its experts.

Each row of K values is cut into K/32 blocks. A block is 16 bytes of E2M1 codes, two per byte, the low
nibble first, plus one E8M0 scale byte: value = FP4[code] * 2**(scale - 127). Experts stay packed in memory;
`dequantize` expands only the rows (experts) the caller picked.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127

# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip


def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=dtype, device=device)


def _pair_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """byte -> (value of its low nibble, value of its high nibble): one lookup decodes two codes."""
    codes = torch.arange(256, device=device)
    lut = _lut(device, dtype)
    return torch.stack((lut[codes & 0x0F], lut[codes >> 4]), dim=-1)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., G, 16] + scales uint8 [..., G] -> values [..., G*32] in `dtype`.

    Exact in bf16 and fp32: an E2M1 value times a power of two fits both (scales below 2**-126 aside).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    values = _pair_lut(blocks.device, dtype)[blocks.int()]  # [..., G, 16, 2]: the low nibble comes first
    scale = torch.exp2(scales.float() - SCALE_BIAS).to(dtype)
    return (values.flatten(-2) * scale.unsqueeze(-1)).flatten(-2)


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., K] (K a multiple of 32) -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    The scale puts each block's largest magnitude at or below 6 (FP4's largest); codes round to nearest.
    """
    if values.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {values.shape[-1]} is not a multiple of {BLOCK}")
    v = values.float().reshape(*values.shape[:-1], -1, BLOCK)
    amax = v.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127)
    scaled = v / torch.exp2(exponent).unsqueeze(-1)
    magnitudes = _lut(v.device, torch.float32)[:8]
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1).to(torch.uint8)
    codes |= (scaled < 0).to(torch.uint8) << 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
