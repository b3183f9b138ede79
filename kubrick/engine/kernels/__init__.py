"""Kubrick's Triton kernels for gpt-oss (sm80 … sm120), each checked against a plain-PyTorch reference.

Kernel (module)                         what it computes                                   reference
rmsnorm.rmsnorm                         RMSNorm, float32 statistics                        reference.rmsnorm
rmsnorm.add_rmsnorm                     residual add as bf16 adds, float32 sum, RMSNorm    reference.rmsnorm(x + y)
router.router                           x W^T + b, top-k, softmax over the k               reference.router
router.norm_router                      (residual add,) RMSNorm and router in one launch   reference.rmsnorm, .router
rope.rope_and_cache                     QKV split + YaRN RoPE + KV-cache write             reference.rope_and_cache
step_inputs.step_inputs                 a step's embeddings, rotary cos/sin and kv_lens    embedding[tokens],
                                        in one launch                                      RotaryEmbedding.cos_sin
moe_gemv.moe_gemv                       MXFP4 MoE for few tokens (decode)                  reference.moe
moe_grouped.moe_grouped                 MXFP4 MoE for many tokens (prefill), expert tiles  reference.moe
moe_wgmma.moe_wgmma                     the same for decode batches on sm90, in Gluon      reference.moe
                                        (moe_grouped hands it its calls there)
attention.attention_prefill             flash-style causal GQA with sinks + window         reference.attention
attention.attention_decode              split-KV decode with sinks + window, GQA shared    reference.attention
sampling.sample                         every row's next token: argmax, or a Gumbel-max    softmax(x / T) frequencies
                                        draw over the tokens at or above the row's cut     (sampler._sample_torch)
nucleus.top_p_cut                       each row's top-p cut (least logit of its nucleus)  sampler.cuts (a sort)
                                        by a radix select over the logits' bits, no sort
moe()                                   picks moe_gemv or moe_grouped by token count

Block sizes come from the per-architecture table in _common.py. Everything runs under TRITON_INTERPRET=1 on
CPU tensors too (tests do that at small shapes); dots then use float32 operands because the 3.6 interpreter
computes bf16 tl.dot wrong. kubrick/engine/fast_model.py runs the whole model on them. Tests: tests/kernels
(GPU ones marked gpu); bench: scripts/bench_kernels.py.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kubrick.engine.kernels.moe_gemv import GemvInput

if not torch.cuda.is_available():
    # Without a GPU, compiled Triton cannot run at all; the interpreter can (slowly). triton.jit reads this
    # when a kernel is decorated, and every kernel module imports this package first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

def uses_gemv(tokens: int, topk: int, device: torch.device) -> bool:
    """Whether moe() takes the GEMV path for this many tokens (then x may come in its layout, see moe_gemv).

    Above the block table's MAX_PAIRS (token, expert) pairs the grouped kernel wins: experts get shared by
    several tokens, so reading each expert once and feeding tensor cores beats one GEMV per pair."""
    from kubrick.engine.kernels._common import block_config

    return tokens * topk <= block_config("moe_gemv", device)["MAX_PAIRS"]


def moe(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, *weights,
        x_gemv: GemvInput | None = None, residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """The MXFP4 MoE block (arguments as kernels.reference.moe): GEMV for few tokens, grouped tiles for many.

    x_gemv: x in the GEMV's input layout, used when the GEMV path runs (see uses_gemv).
    residual: return residual + moe(x) (the GEMV adds it in its last kernel).
    out: a float32 buffer holding the residual (the float32 stream), summed into in place and returned.
    """
    from kubrick.engine.kernels.moe_gemv import moe_gemv
    from kubrick.engine.kernels.moe_grouped import moe_grouped

    if uses_gemv(*expert_ids.shape, x.device):
        return moe_gemv(x, expert_ids, expert_weights, *weights, x_gemv=x_gemv, residual=residual, out=out, **kwargs)
    return moe_grouped(x, expert_ids, expert_weights, *weights, residual=residual, out=out, **kwargs)
