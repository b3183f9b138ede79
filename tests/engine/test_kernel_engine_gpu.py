"""The kernel engine on a GPU: what Engine runs there by default, and greedy tokens equal to the reference's.

Near-tie threshold (when a greedy pick of the kernels differs from the reference's): the reference's own
logits of the two tokens must be within NEAR_TIE x the RMS of that step's reference logits. Why 0.1: the
kernels' whole-model bound (tests/kernels/test_fast_model.py) lets their logits differ from the reference's
by 5 % of the logits' norm; two logits each off by that much in opposite directions swap when their gap is
under 2 x 5 % = 0.1 of the RMS. A larger gap flipped means a real error, and fails.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEAR_TIE = 0.1  # x RMS of the reference logits (see the module docstring)
STEPS = 64  # greedy tokens compared after the prompt's own pick


@pytest.fixture(scope="module")
def checkpoint_20b(tmp_path_factory) -> Path:
    """A random gpt-oss-20b checkpoint; KUBRICK_TEST_CHECKPOINT_20B reuses one (bench_gpu.sh writes it once)."""
    from kubrick.engine.make_checkpoint import make_checkpoint

    given = os.environ.get("KUBRICK_TEST_CHECKPOINT_20B")
    if given and Path(given).is_dir() and any(Path(given).iterdir()):
        return Path(given)
    return make_checkpoint(tmp_path_factory.mktemp("ckpt20b") / "random-20b", layout="original", preset="20b", seed=0)


def test_engine_on_a_gpu_runs_the_kernels_with_a_cuda_graph(tiny_original, monkeypatch):
    pytest.importorskip("openai_harmony")
    from kubrick.engine.api import Message, SamplingParams
    from kubrick.engine.engine import Engine
    from kubrick.engine.fast_model import GraphedFastTransformer
    from kubrick.engine.model import Transformer

    monkeypatch.delenv("KUBRICK_ENGINE_IMPL", raising=False)
    engine = Engine(tiny_original, device="cuda", context_length=256)
    assert engine.implementation == "triton" and engine.version.endswith("-triton")
    assert isinstance(engine.model, GraphedFastTransformer) and engine.model.decoder.cache is engine.cache

    messages = [Message(role="user", content="Count to ten.")]
    params = SamplingParams(temperature=0, max_tokens=40)
    replies = []
    for _ in range(2):  # the second request reuses the cache and replays the same graph at new positions
        events = list(engine.generate(messages, params))
        finished = events[-1]
        assert finished.reason in ("length", "stop") and 1 <= finished.usage.completion_tokens <= 40
        replies.append(("".join(e.text for e in events[:-1]), finished.usage.completion_tokens))
    assert replies[0] == replies[1] and replies[0][0]

    monkeypatch.setenv("KUBRICK_ENGINE_IMPL", "reference")
    reference = Engine(tiny_original, device="cuda", context_length=256)
    assert reference.implementation == "reference" and isinstance(reference.model, Transformer)


def test_kernel_engine_greedy_tokens_equal_the_reference_at_20b(checkpoint_20b):
    from kubrick.engine.checkpoint import load_checkpoint
    from kubrick.engine.fast_model import GraphedFastTransformer
    from kubrick.engine.model import Transformer

    config, weights = load_checkpoint(checkpoint_20b, "cuda")
    reference, kernels = Transformer(config, weights), GraphedFastTransformer(config, weights)
    # 700 prompt tokens in the engine's 512-token chunks: the second chunk starts mid-cache, past the window.
    prompt = torch.randint(0, 199_998, (700,), generator=torch.Generator().manual_seed(11)).cuda()
    ref_cache, kernel_cache = reference.new_cache(1024), kernels.new_cache(1024)  # the latter captures the graph
    for chunk in torch.split(prompt, 512):
        expected, got = reference(chunk, ref_cache), kernels(chunk, kernel_cache)

    # The reference decodes greedily on its own tokens; the kernel engine is fed the same tokens (so up to the
    # first disagreement this is exactly its own greedy run) and every pick of it is checked.
    first_divergence, agreed, errors, ties = None, 0, [], []
    for step in range(STEPS + 1):
        expected, got = expected[-1].float(), got[-1].float()
        errors.append(((got - expected).norm() / expected.norm()).item())
        mine, theirs = int(got.argmax()), int(expected.argmax())
        if mine == theirs:
            agreed += 1
        else:
            gap = (expected[theirs] - expected[mine]).item()
            rms = expected.pow(2).mean().sqrt().item()
            ties.append((step, gap, rms))
            first_divergence = step if first_divergence is None else first_divergence
            assert gap <= NEAR_TIE * rms, f"step {step}: reference prefers {theirs} by {gap:.4f} (RMS {rms:.3f}); not a near-tie"
        if step == STEPS:
            break
        token = torch.tensor([theirs], device="cuda")
        expected, got = reference(token, ref_cache), kernels(token, kernel_cache)

    print(f"greedy picks agreed {agreed}/{STEPS + 1}; first divergence {first_divergence}; near-ties {ties}; "
          f"logit rel. errors median {sorted(errors)[len(errors) // 2]:.4f} max {max(errors):.4f}")
    assert all(math.isfinite(e) for e in errors) and max(errors) < 0.5, errors  # NaN never passes
    assert kernel_cache.length == ref_cache.length == 700 + STEPS
