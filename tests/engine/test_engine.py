"""The Engine as the server uses it: a conversation in, events out, always one Finished at the end."""

from __future__ import annotations

import threading

import pytest
import torch

from kubrick.engine import harmony
from kubrick.engine.api import (
    CancelToken,
    ContentDelta,
    EngineError,
    Finished,
    InvalidRequest,
    Message,
    ReasoningDelta,
    SamplingParams,
)
from kubrick.engine.engine import Engine

HELLO = [Message("user", "Hello! Tell me about the sea.")]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def _text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, (ContentDelta, ReasoningDelta)))


def _finished(events) -> Finished:
    ends = [e for e in events if isinstance(e, Finished)]
    assert len(ends) == 1 and events[-1] is ends[0]
    return ends[0]


def test_a_random_model_still_answers_and_ends_at_max_tokens(engine):
    events = list(engine.generate(HELLO, GREEDY))
    end = _finished(events)
    assert end.reason == "length"
    assert end.usage.completion_tokens == 24
    assert end.usage.prompt_tokens == len(harmony.render_prompt(HELLO, "medium"))
    assert end.usage.time_to_first_token_s > 0 and end.usage.tokens_per_s > 0
    assert _text(events).strip()  # tokens outside the Harmony format are shown, not swallowed


def test_greedy_gives_the_same_reply_every_time_even_with_a_warm_cache(engine, tiny_original):
    first = _text(engine.generate(HELLO, GREEDY))
    list(engine.generate([Message("user", "Something else entirely")], GREEDY))
    again = _text(engine.generate(HELLO, GREEDY))
    fresh = _text(Engine(tiny_original, context_length=256).generate(HELLO, GREEDY))
    assert first == again == fresh


def _small_chunks(engine: Engine) -> Engine:
    engine.prefill_chunk = 16  # so that short test prompts span several chunks
    return engine


def test_a_seed_fixes_a_sampled_reply(engine):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=16)
    assert _text(engine.generate(HELLO, params)) == _text(engine.generate(HELLO, params))
    other = SamplingParams(temperature=1.0, seed=12, max_tokens=16)
    assert _text(engine.generate(HELLO, params)) != _text(engine.generate(HELLO, other))


def test_a_follow_up_turn_reuses_the_cache_and_matches_a_cold_start(tiny_original):
    warm_engine = _small_chunks(Engine(tiny_original, context_length=256))
    reply = _text(warm_engine.generate(HELLO, GREEDY))
    follow_up = HELLO + [Message("assistant", reply), Message("user", "And the mountains?")]
    warm = _text(warm_engine.generate(follow_up, GREEDY))
    assert warm_engine.last_reused_tokens >= 48  # the first turn's whole chunks were not recomputed
    cold_engine = _small_chunks(Engine(tiny_original, context_length=256))
    cold = _text(cold_engine.generate(follow_up, GREEDY))
    assert cold_engine.last_reused_tokens == 0
    assert warm == cold


def test_asking_the_same_again_reuses_the_cache_and_gives_the_same_reply(tiny_original):
    engine = _small_chunks(Engine(tiny_original, context_length=256))
    params = SamplingParams(temperature=0, max_tokens=40)
    first = _text(engine.generate(HELLO, params))
    second = _text(engine.generate(HELLO, params))
    assert engine.last_reused_tokens > 0
    assert first == second


def test_a_stop_string_ends_the_reply_just_before_it(engine):
    full = _text(engine.generate(HELLO, SamplingParams(temperature=0, max_tokens=40)))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the random reply should have text in its middle"
    events = list(engine.generate(HELLO, SamplingParams(temperature=0, max_tokens=40, stop=(stop,))))
    assert _text(events) == full[: full.index(stop)]
    assert _finished(events).reason == "stop"


def test_a_prompt_longer_than_the_context_is_refused_before_any_event(tiny_original):
    small = Engine(tiny_original, context_length=80)
    with pytest.raises(InvalidRequest, match="more than the context of 80 allows"):
        small.generate([Message("user", "word " * 100)], GREEDY)
    assert _finished(list(small.generate([Message("user", "hi")], GREEDY))).reason in ("length", "stop")


def test_the_reply_stops_when_the_context_is_full(tiny_original):
    small = Engine(tiny_original, context_length=80)
    events = list(small.generate(HELLO, SamplingParams(temperature=0, max_tokens=1000)))
    end = _finished(events)
    assert end.reason == "length"
    assert end.usage.prompt_tokens + end.usage.completion_tokens == 80
    assert small.kv_cache_usage() == pytest.approx(79 / 80)


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(max_tokens=-1), "max_tokens must be at least 1"),
        (SamplingParams(top_p=1.5), "top_p must be in \\(0, 1\\]"),
        (SamplingParams(temperature=float("nan")), "temperature must be a finite number"),
        (SamplingParams(reasoning_effort="extreme"), "reasoning_effort must be low, medium or high"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_reason(engine, params, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.generate(HELLO, params)


def test_cancelling_from_another_thread_ends_the_stream_with_cancelled(engine):
    cancel = CancelToken()
    events = []
    for event in engine.generate(HELLO, SamplingParams(temperature=0, max_tokens=500), cancel):
        events.append(event)
        if len(events) == 3:
            threading.Thread(target=cancel.cancel).start()
    end = _finished(events)
    assert end.reason == "cancelled"
    assert end.usage.completion_tokens < 500
    # the engine serves the next request normally
    assert _finished(list(engine.generate(HELLO, GREEDY))).reason == "length"


def test_a_cancelled_token_before_the_start_yields_only_finished(engine):
    cancel = CancelToken()
    cancel.cancel()
    events = list(engine.generate(HELLO, GREEDY, cancel))
    assert len(events) == 1 and events[0].reason == "cancelled" and events[0].usage.completion_tokens == 0


def test_kv_cache_usage_is_a_fraction(engine):
    list(engine.generate(HELLO, GREEDY))
    assert 0 < engine.kv_cache_usage() < 1


def test_settings_come_from_arguments_then_environment(tiny_original, tiny_hf, monkeypatch):
    monkeypatch.setenv("TRITON_CHECKPOINT", str(tiny_original))
    monkeypatch.setenv("TRITON_DEVICE", "cpu")
    monkeypatch.setenv("TRITON_CONTEXT_LENGTH", "300")
    from_env = Engine.from_env()
    assert (from_env.checkpoint, from_env.device, from_env.context_length) == (tiny_original, "cpu", 300)
    from_args = Engine.from_env(checkpoint=tiny_hf, context_length=128)
    assert (from_args.checkpoint, from_args.context_length) == (tiny_hf, 128)
    monkeypatch.delenv("TRITON_CONTEXT_LENGTH")
    assert Engine.from_env().context_length == 8192
    monkeypatch.setenv("TRITON_CONTEXT_LENGTH", "lots")
    with pytest.raises(EngineError, match="TRITON_CONTEXT_LENGTH must be a whole number"):
        Engine.from_env()


@pytest.mark.parametrize("value,reuse", [("0", False), ("OFF", False), (" No ", False), ("False", False), ("1", True),
                                         ("on", True)])
def test_prefix_cache_switch_reads_any_case(tiny_original, monkeypatch, value, reuse):
    monkeypatch.setenv("KUBRICK_PREFIX_CACHE", value)
    assert Engine.from_env(checkpoint=tiny_original, device="cpu", context_length=128).paged.prefix_reuse is reuse


def test_no_checkpoint_anywhere_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_CHECKPOINT", raising=False)
    monkeypatch.delenv("TRITON_MODEL", raising=False)
    with pytest.raises(EngineError, match="set TRITON_CHECKPOINT"):
        Engine.from_env()


# --- the Harmony stream through the engine ---------------------------------------------------------------


class ScriptedModel:
    """The real tiny model (so the cache fills as usual) with its logits overridden to say a fixed token
    sequence: a random checkpoint cannot be made to speak Harmony, a trained one would."""

    def __init__(self, model, script: list[int]):
        self.model, self.script = model, list(script)

    def __call__(self, tokens, cache, all_logits=False):
        logits = self.model(tokens, cache, all_logits)
        forced = torch.full_like(logits, -1e9)
        forced[:, self.script.pop(0) if self.script else 0] = 0
        return forced


def _scripted(tiny_original, text: str) -> Engine:
    engine = Engine(tiny_original, context_length=256)
    engine.model = ScriptedModel(engine.model, harmony.encoding().encode(text, allowed_special="all"))
    return engine


def test_reasoning_and_answer_arrive_separately_and_return_stops(tiny_original):
    engine = _scripted(
        tiny_original,
        "<|channel|>analysis<|message|>Think first.<|end|><|start|>assistant<|channel|>final<|message|>The sea is big.<|return|>never shown",
    )
    events = list(engine.generate(HELLO, SamplingParams(temperature=0, max_tokens=100)))
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Think first."
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "The sea is big."
    end = _finished(events)
    assert end.reason == "stop"


def test_a_tool_call_token_ends_the_turn(tiny_original):
    engine = _scripted(tiny_original, "<|channel|>commentary to=functions.f<|message|>{}<|call|>more")
    events = list(engine.generate(HELLO, SamplingParams(temperature=0, max_tokens=100)))
    assert _finished(events).reason == "stop"
    assert "more" not in _text(events)


def test_a_checkpoint_too_small_for_harmony_tokens_is_refused(tmp_path):
    import json

    from kubrick.engine.config import PRESETS
    from kubrick.engine.make_checkpoint import make_checkpoint

    config = tmp_path / "small-vocab.json"
    config.write_text(json.dumps(PRESETS["tiny"].to_original_json() | {"vocab_size": 1000}))
    folder = make_checkpoint(tmp_path / "ck", config_file=config)
    with pytest.raises(EngineError, match="has a vocabulary of 1000 tokens; gpt-oss's Harmony format needs 201088"):
        Engine(folder)


def test_the_implementation_comes_from_the_argument_or_kubrick_engine_impl(tiny_original, monkeypatch):
    monkeypatch.delenv("KUBRICK_ENGINE_IMPL", raising=False)
    assert Engine(tiny_original, context_length=128).version.endswith("-reference")
    monkeypatch.setenv("KUBRICK_ENGINE_IMPL", "turbo")
    with pytest.raises(EngineError, match="unknown engine implementation 'turbo' \\(KUBRICK_ENGINE_IMPL\\); use reference or triton"):
        Engine(tiny_original, context_length=128)
    assert Engine(tiny_original, context_length=128, implementation="reference").implementation == "reference"


def test_a_kv_cache_fraction_applies_to_the_memory_the_graphs_leave(monkeypatch):
    # On a GPU the engine measures its CUDA graphs first (Engine._measure_graphs) and holds their bytes back:
    # the fraction is of what weights and graphs leave free; a size is a size.
    from kubrick.engine import engine as engine_module

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.delenv("KUBRICK_KV_CACHE_MEMORY", raising=False)
    cuda = torch.device("cuda", 0)
    assert engine_module.kv_cache_budget("0.5", cuda, held_back=2 * gib) == 4 * gib
    assert engine_module.kv_cache_budget(None, cuda, held_back=2 * gib) == int(8 * gib * 0.9)
    assert engine_module.kv_cache_budget("2GiB", cuda, held_back=2 * gib) == 2 * gib
    assert engine_module.kv_cache_budget("0.5", cuda, held_back=11 * gib) == 0  # (then "too small", at once)
    assert engine_module.kv_cache_fraction("2GiB", cuda) is None and engine_module.kv_cache_fraction(None, cuda) == 0.9
    assert engine_module.kv_cache_fraction(None, torch.device("cpu")) is None  # 256 MiB on a CPU
