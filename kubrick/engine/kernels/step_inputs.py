"""A step's inputs in one launch: the tokens' embeddings, their rotary cos/sin, and the attention's key counts.

The model's first work each step used to be ~9 small torch kernels (an index for the embeddings, float, multiply,
cos, sin and two scalings for the angles, an add and a cast for kv_lens). At batch 1 each costs a launch and, not
being a PDL kernel, cuts the chain of programmatic launches. One program per token does all of it here: the
batch-1 step on the H100 ran ~18 µs (1.1 %) faster (BENCHMARKS.md run 38).

The angles are the reference's (RotaryEmbedding.cos_sin): float32 position times inv_freq, then cos and sin times
the YaRN concentration. tl.cos / tl.sin compile to libdevice's full-precision cosf / sinf on sm90 (the same PTX as
libdevice.cos, which the CPU interpreter lacks), as torch's do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import pdl, pdl_start

KV_LENS_NONE, KV_LENS_EACH, KV_LENS_LAST = 0, 1, 2  # kv_lens[t] = position + 1 for every token, or the last only


@triton.jit(do_not_specialize=["n_tokens"])  # one compile for every step size (a compile stalls all streams)
def _step_inputs_kernel(tokens_ptr, positions_ptr, embedding_ptr, x_ptr, inv_freq_ptr, cos_ptr, sin_ptr, kv_lens_ptr,
                        n_tokens, concentration, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
                        KV_LENS: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    token = tl.load(tokens_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    row = tl.load(embedding_ptr + token * HIDDEN + cols, mask=cols < HIDDEN)
    tl.store(x_ptr + t * HIDDEN + cols, row, mask=cols < HIDDEN)
    position = tl.load(positions_ptr + t)
    d = tl.arange(0, HALF)
    angle = position.to(tl.float32) * tl.load(inv_freq_ptr + d)
    tl.store(cos_ptr + t * HALF + d, tl.cos(angle) * concentration)
    tl.store(sin_ptr + t * HALF + d, tl.sin(angle) * concentration)
    if KV_LENS == 1:  # KV_LENS_EACH
        tl.store(kv_lens_ptr + t, (position + 1).to(tl.int32))
    if KV_LENS == 2:  # KV_LENS_LAST
        if t == n_tokens - 1:
            tl.store(kv_lens_ptr, (position + 1).to(tl.int32))


def step_inputs(tokens: torch.Tensor, positions: torch.Tensor, embedding: torch.Tensor, inv_freq: torch.Tensor,
                concentration: float, kv_lens: int = KV_LENS_NONE):
    """tokens, positions [n] (integer tensors on the device) -> (x = embedding[tokens] [n, H], cos, sin [n, D/2]
    float32, kv_lens int32: [n] positions + 1 (KV_LENS_EACH), [1] the last one's (KV_LENS_LAST), or None)."""
    n = tokens.shape[0]
    hidden = embedding.shape[1]
    half = inv_freq.shape[0]
    assert embedding.is_contiguous() and inv_freq.is_contiguous() and half == triton.next_power_of_2(half)
    assert positions.shape == tokens.shape and tokens.is_contiguous() and positions.is_contiguous()
    x = torch.empty(n, hidden, dtype=embedding.dtype, device=embedding.device)
    cos = torch.empty(n, half, dtype=torch.float32, device=embedding.device)
    sin = torch.empty_like(cos)
    lens = None
    if kv_lens != KV_LENS_NONE:
        lens = torch.empty(n if kv_lens == KV_LENS_EACH else 1, dtype=torch.int32, device=embedding.device)
    if n:
        lens_out = lens if lens is not None else cos  # (never written without kv_lens)
        _step_inputs_kernel[(n,)](tokens, positions, embedding, x, inv_freq, cos, sin, lens_out, n, float(concentration),
                                  HIDDEN=hidden, BLOCK_H=triton.next_power_of_2(hidden),
                                  HALF=half, KV_LENS=kv_lens, **pdl(embedding.device), num_warps=4)
    return x, cos, sin, lens
