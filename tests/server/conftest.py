"""One real tritonserver for the whole test session: the real engine on the tiny random checkpoint, on free
loopback ports, always stopped at the end (even when tests fail)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from kubrick.engine.make_checkpoint import make_checkpoint
from kubrick.server.process import MODEL_NAME, TritonServer, start_local_server
from kubrick.server.serve import shipped_model_repository

TEST_CONTEXT_LENGTH = 512  # small, so a "too long" prompt is cheap to build


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", layout="original", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def triton_server(tiny_checkpoint) -> TritonServer:
    server = start_local_server(tiny_checkpoint, shipped_model_repository(), context_length=TEST_CONTEXT_LENGTH)
    try:
        yield server
    finally:
        server.stop()


def messages(*contents: str) -> str:
    """text_input for a conversation of user turns."""
    return json.dumps([{"role": "user", "content": c} for c in contents])


def stream_events(url: str, text_input, parameters: dict | None = None, timeout: float = 120.0) -> list[dict]:
    """POST generate_stream and return the model's JSON events, in order; a Triton error becomes {"triton_error"}."""
    body = {"text_input": text_input, "parameters": {"streaming": True, **(parameters or {})}}
    events = []
    with httpx.stream("POST", f"{url}/v2/models/{MODEL_NAME}/generate_stream", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                payload = json.loads(line[5:])
                if "error" in payload:
                    events.append({"triton_error": payload["error"]})
                else:
                    events.append(json.loads(payload["text_output"]))
    return events


def metric_values(server: TritonServer, name: str) -> dict[str, float]:
    """Each sample of one Prometheus metric: {label text: value}."""
    values = {}
    for line in httpx.get(server.metrics_url, timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            values[labels[len(name):]] = float(value)
    return values
