"""The kernel engine on a GPU: what Engine runs there by default, and greedy tokens against the reference's.

The random 20b model is chaotic: one rounding anywhere moves its logits a lot. Seen on the H100 (random 20b,
seed 0, 700-token prompt): the reference against itself, only its prefill chunking changed (one chunk of 700
instead of 512 + 188), gives logits 25 % apart (norm-wise) and another greedy pick on the first token; the
kernels against the reference: median 21 % over 65 steps, 26 of 65 picks equal, first divergence at step 0
with the reference preferring its token by 0.19 (logits' RMS 1.0). So "equal for 64 tokens" cannot hold on
random weights for any two correct bf16 implementations, the reference included. What is checked instead:

* calibration: the kernels' logits are typically (median over the steps) no farther from the reference's
  than 3x the reference's own distance to itself with the other prefill chunking, step by step on the same
  tokens, or 5 % where that distance is ~0 (a model that is not chaotic: the tiny one on a CPU gives 1.8 %);
  a wrong kernel lands near sqrt(2) (unrelated logits), far above. Why 3x: the kernels round at more points
  than the twin differs in, and the MoE's float32 atomics sum in another order every run, so their median
  moves from run to run: 0.23-0.32 on the H100 over the runs of BENCHMARKS.md, twin ~0.13, and the
  2x of earlier sessions (0.267) sat inside that spread;
* every flip of a greedy pick is a near-tie: the reference's gap between its token and the kernels' is within
  NEAR_TIE_SIGMAS standard deviations of the difference of two logits' errors at that step, i.e.
  gap <= 4 x sqrt(2) x RMS(kernel logits - reference logits). 4, not 3, because the kernels' pick is the
  candidate whose error came out highest among the several tokens near the top. A flip with a larger gap
  means one logit is off far beyond the rest (e.g. a wrong row of the unembedding): the test fails.
The figures print with -s (bench_gpu.sh does).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEAR_TIE_SIGMAS = 4  # see the module docstring
NOISE_FACTOR = 3  # kernels' median logit error <= this x the reference's own (other chunking) median
NOISE_FLOOR = 0.05  # ... or this, the kernels' whole-model bound where the model is not chaotic (tests/kernels)
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
    engine = Engine(tiny_original, device="cuda", context_length=256, kv_cache_memory="256MiB")
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
    reference = Engine(tiny_original, device="cuda", context_length=256, kv_cache_memory="256MiB")
    assert reference.implementation == "reference" and isinstance(reference.model, Transformer)


def test_kernel_engine_greedy_tokens_follow_the_reference_at_20b(checkpoint_20b):
    from kubrick.engine.checkpoint import load_checkpoint
    from kubrick.engine.fast_model import GraphedFastTransformer
    from kubrick.engine.model import Transformer

    config, weights = load_checkpoint(checkpoint_20b, "cuda")
    reference, kernels = Transformer(config, weights), GraphedFastTransformer(config, weights)
    prompt = torch.randint(0, 199_998, (700,), generator=torch.Generator().manual_seed(11)).cuda()
    # The kernel engine and the reference take the prompt in the engine's 512-token chunks (the second chunk
    # starts mid-cache, past the window); the reference's twin takes it in one chunk: same math, other rounding.
    ref_cache, kernel_cache, twin_cache = reference.new_cache(1024), kernels.new_cache(1024), reference.new_cache(1024)
    for chunk in torch.split(prompt, 512):
        expected, got = reference(chunk, ref_cache), kernels(chunk, kernel_cache)  # kernels: graph captured on new_cache
    twin = reference(prompt, twin_cache)

    def rel(a, b) -> float:
        return ((a - b).norm() / b.norm()).item()

    # The reference decodes greedily on its own tokens; the kernel engine and the twin are fed the same tokens
    # (so up to its first disagreement this is exactly the kernel engine's own greedy run), every pick checked.
    steps = []  # (step, kernels' rel. error, twin's rel. error, kernels' pick, twin's pick, reference's, gap, allowed)
    for step in range(STEPS + 1):
        expected, got, twin = expected[-1].float(), got[-1].float(), twin[-1].float()
        diff = got - expected
        mine, theirs = int(got.argmax()), int(expected.argmax())
        gap = (expected[theirs] - expected[mine]).item()
        allowed = NEAR_TIE_SIGMAS * math.sqrt(2) * diff.pow(2).mean().sqrt().item()
        steps.append((step, rel(got, expected), rel(twin, expected), mine, int(twin.argmax()), theirs, gap, allowed))
        if step == STEPS:
            break
        token = torch.tensor([theirs], device="cuda")
        expected, got, twin = reference(token, ref_cache), kernels(token, kernel_cache), reference(token, twin_cache)

    def median(values):
        return sorted(values)[len(values) // 2]

    errors, noise = [s[1] for s in steps], [s[2] for s in steps]
    flips = [s for s in steps if s[3] != s[5]]
    print(f"\nkernels vs reference: picks agreed {len(steps) - len(flips)}/{len(steps)}, first divergence at step "
          f"{flips[0][0] if flips else None}, logit rel. error median {median(errors):.4f} max {max(errors):.4f}"
          f"\nreference vs its one-chunk twin: picks agreed {sum(s[4] == s[5] for s in steps)}/{len(steps)}, "
          f"logit rel. error median {median(noise):.4f} max {max(noise):.4f}"
          "\nflips (reference gap, allowed): " + ", ".join(f"{s[0]}: {s[6]:.4f} ({s[7]:.4f})" for s in flips))
    assert all(math.isfinite(e) for e in errors), errors  # NaN never passes
    assert median(errors) <= max(NOISE_FACTOR * median(noise), NOISE_FLOOR), (median(errors), median(noise))
    for step, _, _, mine, _, theirs, gap, allowed in flips:
        assert gap <= allowed, f"step {step}: the reference prefers {theirs} over the kernels' {mine} by {gap:.4f}; not a near-tie"
    assert kernel_cache.length == ref_cache.length == twin_cache.length == 700 + STEPS
