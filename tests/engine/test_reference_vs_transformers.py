"""The reference model agrees with an implementation nobody here wrote: Hugging Face transformers'
GptOssForCausalLM, loading the very same tiny random checkpoint (HF layout, MXFP4 experts).

transformers dequantises the MXFP4 experts itself on CPU (its own code; with `Mxfp4Config(dequantize=True)`
it needs neither the `kernels` package nor accelerate), so the comparison also covers our MXFP4 decoding,
the tensor-name mapping, YaRN, sinks, the sliding window and the MoE.

Tolerances. Both models hold bf16 weights, but they round activations at different places (gpt-oss keeps
the residual stream in bf16, as we do; transformers' eager attention also runs in bf16 when asked). So exact
equality is impossible, and the right yardstick is the error bf16 itself brings: we run transformers in
float32 (the exact math on the same dequantised weights) and in bfloat16, and require our logits to be at
most 1.5x as far from the float32 logits as transformers' own bf16 run is, and never more than 0.15 (max)
/ 0.02 (mean) absolute on logits whose standard deviation is about 1. A real mistake (a wrong rotary
half, a missing sink, an off-by-one window, swapped gate/linear columns) moves logits by far more than that.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

PROMPT = 24  # three times the tiny sliding window (8): the prompt already runs past it
DECODE = 12  # then step by step, further past it


def _transformers_model(folder, dtype):
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True)
    )
    return model.eval()


def _transformers_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill PROMPT tokens, then decode the rest one token at a time through transformers' own cache."""
    import inspect

    from transformers.cache_utils import DynamicCache

    # transformers 5.x calls the cache `cache` (`past_key_values` warns, and goes in 5.40); 4.x only knows the latter.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids[None, :PROMPT], **{name: DynamicCache(config=model.config)}, use_cache=True)
        logits = [out.logits[0].float()]
        for token in ids[PROMPT:]:
            out = model(token.view(1, 1), **{name: getattr(out, name)}, use_cache=True)
            logits.append(out.logits[0].float())
    return torch.cat(logits)


def _our_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from kubrick.engine.checkpoint import load_checkpoint
    from kubrick.engine.model import Transformer

    config, weights = load_checkpoint(folder)
    model = Transformer(config, weights)
    cache = model.new_cache(64)
    logits = [model(ids[:PROMPT], cache, all_logits=True)]
    for token in ids[PROMPT:]:
        logits.append(model(token.view(1), cache))
    return torch.cat(logits)


@pytest.fixture(scope="module")
def token_ids():
    generator = torch.Generator().manual_seed(1)
    # ordinary text tokens plus a few Harmony specials, as a real prompt has
    ids = torch.randint(0, 199_998, (PROMPT + DECODE,), generator=generator)
    ids[0], ids[5] = 200006, 200008  # <|start|>, <|message|>
    return ids


@pytest.mark.slow
def test_logits_match_transformers_in_prefill_and_decode_past_the_window(tiny_hf, token_ids):
    ours = _our_logits(tiny_hf, token_ids)
    exact = _transformers_logits(_transformers_model(tiny_hf, torch.float32), token_ids)
    theirs_bf16 = _transformers_logits(_transformers_model(tiny_hf, torch.bfloat16), token_ids)
    assert ours.shape == exact.shape == (PROMPT + DECODE, 201088)

    our_error = (ours - exact).abs()
    bf16_error = (theirs_bf16 - exact).abs()
    for part, rows in (("prefill", slice(0, PROMPT)), ("decode", slice(PROMPT, None))):
        ours_max, ours_mean = our_error[rows].max().item(), our_error[rows].mean().item()
        ref_max, ref_mean = bf16_error[rows].max().item(), bf16_error[rows].mean().item()
        assert ours_max <= max(1.5 * ref_max, 0.02) and ours_max <= 0.15, (part, ours_max, ref_max)
        assert ours_mean <= max(1.5 * ref_mean, 0.002) and ours_mean <= 0.02, (part, ours_mean, ref_mean)
    # The token our greedy decoder picks is the exact best, or one whose exact logit is within bf16 rounding
    # of it (the top two of 201088 random logits are often closer than one bf16 step, 0.03 at their size).
    picked = exact.gather(1, ours.argmax(-1, keepdim=True)).squeeze(1)
    assert (exact.amax(-1) - picked).max() <= 0.1
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75


def test_both_layouts_of_one_checkpoint_give_identical_logits(tiny_original, tiny_hf, token_ids):
    assert torch.equal(_our_logits(tiny_original, token_ids), _our_logits(tiny_hf, token_ids))


def test_our_mxfp4_decoding_matches_transformers(tiny_hf):
    from safetensors import safe_open
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from kubrick.engine import mxfp4

    with safe_open(str(tiny_hf / "model.safetensors"), framework="pt") as f:
        blocks = f.get_tensor("model.layers.1.mlp.experts.gate_up_proj_blocks")
        scales = f.get_tensor("model.layers.1.mlp.experts.gate_up_proj_scales")
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, H, 2I]
    ours = mxfp4.dequantize(blocks, scales, torch.float32)  # [E, 2I, H]
    assert torch.equal(ours.transpose(1, 2), theirs)
