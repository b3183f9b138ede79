"""The llm_decoupled model inside the real tritonserver, driven over HTTP and gRPC like clients do."""

from __future__ import annotations

import json
import queue
import time

import httpx
import numpy as np
import pytest

from kubrick.server.process import MODEL_NAME

from .conftest import TEST_CONTEXT_LENGTH, messages, metric_values, stream_events

pytestmark = pytest.mark.slow

GOOD = {"temperature": 0, "max_tokens": 12}


def assert_completed(events: list[dict]) -> dict:
    """A reply that streamed text and ended with one complete event; returns that event."""
    assert events, "no events"
    assert events[-1]["type"] == "complete", events[-1]
    assert all(e["type"] in ("chunk", "reasoning") for e in events[:-1]), events
    assert any(e["content"] for e in events[:-1]), "the reply carried no text"
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert set(usage) >= {"prompt_tokens", "completion_tokens", "time_to_first_token_s", "tokens_per_s"}
    return events[-1]


def test_server_and_model_report_ready(triton_server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready"):
        assert httpx.get(triton_server.url + path, timeout=10).status_code == 200, path


def test_model_config_is_decoupled_with_one_text_input_on_cpu(triton_server):
    config = httpx.get(f"{triton_server.url}/v2/models/{MODEL_NAME}/config", timeout=10).json()
    assert config["model_transaction_policy"]["decoupled"] is True
    assert [i["name"] for i in config["input"]] == ["text_input"]  # no "parameters" tensor
    assert [o["name"] for o in config["output"]] == ["text_output"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"  # this machine has no GPU


def test_streamed_chat_over_http(triton_server):
    events = stream_events(triton_server.url, messages("Hello! Who are you?"), {"temperature": 0, "max_tokens": 24})
    complete = assert_completed(events)
    assert complete["usage"]["completion_tokens"] <= 24
    assert complete["finish_reason"] in ("stop", "length")


def test_max_tokens_bounds_the_reply(triton_server):
    events = stream_events(triton_server.url, messages("Count to one hundred."), {"temperature": 0, "max_tokens": 3})
    assert assert_completed(events)["usage"]["completion_tokens"] <= 3


def test_streamed_chat_over_grpc_stream_infer(triton_server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton_server.config.grpc_port}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([messages("Hello over gRPC").encode()], dtype=np.object_))
        client.async_stream_infer(
            MODEL_NAME, [text], request_id="grpc-1", parameters=GOOD, enable_empty_final_response=True
        )
        events = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            output = result.as_numpy("text_output")
            if output is not None:
                events.append(json.loads(output.reshape(-1)[0]))
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert_completed(events)
    # The same request over HTTP gives the same reply: one model, two protocols.
    http_events = stream_events(triton_server.url, messages("Hello over gRPC"), GOOD)
    assert [e.get("content") for e in events[:-1]] == [e.get("content") for e in http_events[:-1]]


BAD_REQUESTS = {
    "text_input is not JSON": ("this is not json", {}, "not valid JSON"),
    "text_input is not a list": ('{"role": "user", "content": "hi"}', {}, "must be a JSON list"),
    "no messages": ("[]", {}, "no messages"),
    "message without role": ('[{"content": "hi"}]', {}, '"role"'),
    "message without content": ('[{"role": "user"}]', {}, '"content"'),
    "unknown role": ('[{"role": "wizard", "content": "hi"}]', {}, "unknown role"),
    "temperature is a word": (messages("hi"), {"temperature": "hot"}, "temperature"),
    "max_tokens negative": (messages("hi"), {"max_tokens": -3}, "max_tokens"),
    "top_p out of range": (messages("hi"), {"top_p": 7}, "top_p"),
    # json.loads turns "\\udce9" into a lone surrogate; harmony refuses it, and that once killed the engine thread
    "content with a lone surrogate": ('[{"role": "user", "content": "caf\\udce9"}]', {}, "lone surrogate (\\udce9)"),
    "prompt beyond the context": (messages("word " * (TEST_CONTEXT_LENGTH * 2)), {}, "context"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_one_error_event_and_the_server_keeps_serving(triton_server, case):
    text_input, parameters, words = BAD_REQUESTS[case]
    events = stream_events(triton_server.url, text_input, parameters)
    assert len(events) == 1, events
    assert events[0]["type"] == "error"
    assert words in events[0]["content"]
    assert_completed(stream_events(triton_server.url, messages("Are you still there?"), GOOD))


def test_same_greedy_request_gives_the_same_events(triton_server):
    request = (messages("Tell me a story about a lighthouse."), {"temperature": 0, "max_tokens": 24})
    first = stream_events(triton_server.url, *request)
    stream_events(triton_server.url, messages("Something else in between."), GOOD)
    second = stream_events(triton_server.url, *request)
    assert_completed(first)
    assert first[:-1] == second[:-1]
    assert first[-1]["usage"]["completion_tokens"] == second[-1]["usage"]["completion_tokens"]


def test_same_seed_gives_the_same_sampled_reply(triton_server):
    request = (messages("Pick a random word."), {"temperature": 1.0, "seed": 7, "max_tokens": 16})
    first, second = stream_events(triton_server.url, *request), stream_events(triton_server.url, *request)
    assert_completed(first)
    assert first[:-1] == second[:-1]


def test_client_that_disconnects_frees_the_engine(triton_server):
    cancelled_before = sum(v for k, v in metric_values(triton_server, "kubrick_requests_finished_total").items()
                           if 'reason="cancelled"' in k)
    body = {
        "text_input": messages("Write a very long essay about rivers."),
        "parameters": {"streaming": True, "temperature": 0, "max_tokens": TEST_CONTEXT_LENGTH},
    }
    url = f"{triton_server.url}/v2/models/{MODEL_NAME}/generate_stream"
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # the reply has started; walk away mid-reply
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = sum(metric_values(triton_server, "kubrick_requests_running").values())
        cancelled = sum(v for k, v in metric_values(triton_server, "kubrick_requests_finished_total").items()
                        if 'reason="cancelled"' in k)
        if running == 0 and cancelled == cancelled_before + 1:
            break
        time.sleep(0.2)
    assert running == 0, "the engine is still generating for a client that left"
    assert cancelled == cancelled_before + 1, "the request was not cancelled in the engine"
    assert_completed(stream_events(triton_server.url, messages("Next customer, please."), GOOD))


def test_metrics_are_published_with_model_and_engine_version(triton_server):
    assert_completed(stream_events(triton_server.url, messages("Count my tokens."), GOOD))
    text = httpx.get(triton_server.metrics_url, timeout=10).text
    for name in (
        "kubrick_generated_tokens_total",
        "kubrick_prompt_tokens_total",
        "kubrick_time_to_first_token_seconds_count",
        "kubrick_time_per_output_token_seconds_count",
        "kubrick_requests_running",
        "kubrick_requests_waiting",
        "kubrick_kv_cache_usage_ratio",
        "kubrick_requests_finished_total",
    ):
        samples = metric_values(triton_server, name)
        assert samples, f"{name} is missing"
        assert all(f'model="{MODEL_NAME}"' in labels and "engine_version=" in labels for labels in samples), samples
    assert sum(metric_values(triton_server, "kubrick_generated_tokens_total").values()) > 0
    assert sum(metric_values(triton_server, "kubrick_prompt_tokens_total").values()) > 0
    assert sum(metric_values(triton_server, "kubrick_time_to_first_token_seconds_count").values()) > 0
    assert 0 <= sum(metric_values(triton_server, "kubrick_kv_cache_usage_ratio").values()) <= 1
    assert "nv_inference_request_success" in text  # Triton's own metrics are still there
