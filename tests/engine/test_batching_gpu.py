"""Continuous batching on a GPU: the kernel engine behind the real scheduler, many requests at once."""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_kernel_engine_batches_concurrent_requests_over_the_paged_cache(tiny_original, monkeypatch):
    pytest.importorskip("openai_harmony")
    from kubrick.engine.api import EngineError, Finished, Message, SamplingParams
    from kubrick.engine.engine import Engine
    from kubrick.engine.scheduler import Scheduler

    monkeypatch.delenv("KUBRICK_ENGINE_IMPL", raising=False)
    engine = Engine(tiny_original, device="cuda", context_length=256, kv_cache_memory="64MiB", max_batch=8)
    assert engine.paged is not None and engine.model.paged_decoder.cache is engine.paged
    scheduler = Scheduler(engine)
    steps = {"batched": 0, "chained": 0}
    real = engine.forward_batch

    def counting(segments, **kwargs):  # how many sequences shared a step, at most; steps fed on the GPU
        steps["batched"] = max(steps["batched"], len(segments))
        steps["chained"] += kwargs.get("device_tokens") is not None
        return real(segments, **kwargs)

    engine.forward_batch = counting
    done, outcomes = threading.Event(), {}
    params = SamplingParams(temperature=0.0, max_tokens=24, reasoning_effort="low")

    def collect(i):
        def on(outcome):
            if isinstance(outcome, (Finished, EngineError)):
                outcomes[i] = outcome
                if len(outcomes) == 6:
                    done.set()
        return on

    try:
        for i in range(6):
            scheduler.submit([Message("user", f"question number {i}")], params, collect(i))
        assert done.wait(120)
    finally:
        scheduler.stop()
    assert all(isinstance(o, Finished) for o in outcomes.values()), outcomes
    assert all(o.usage.completion_tokens >= 1 for o in outcomes.values())
    assert steps["batched"] >= 2  # requests really ran side by side
    assert steps["chained"] >= 5  # greedy decode steps were queued behind each other
    assert engine.paged.full_pool.referenced() == 0  # every block given back (prefix blocks stay cached, unreferenced)
