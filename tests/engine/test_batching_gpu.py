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


def test_the_kv_cache_is_sized_from_the_memory_left_after_weights_and_graphs(tiny_original, monkeypatch):
    # --kv-cache-memory 0.5: half of what the weights and the CUDA graphs leave free. The graphs are measured by
    # capturing them once over a small cache; were they not counted, the cache would take half of the memory
    # free after the weights and leave the graphs' share less than that free (free − cache = −graphs).
    from kubrick.engine.engine import Engine

    monkeypatch.delenv("KUBRICK_ENGINE_IMPL", raising=False)
    engine = Engine(tiny_original, device="cuda", context_length=256, kv_cache_memory=0.5, max_batch=8,
                    step_tokens=64)
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    graphs, cache = engine.graph_bytes, engine.paged.nbytes()
    assert graphs > 64 * 2**20  # the graphs' pools and the eager steps' workspaces of 8-row and 64-row steps
    assert abs(free - cache) < graphs / 2, (free, cache, graphs)
    assert f"sized after the CUDA graphs' {graphs / 2**20:.0f} MiB" in engine.kv_cache_description()
    assert engine.model.paged_decoder.cache is engine.paged  # the graphs replay over the real cache
