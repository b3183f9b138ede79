"""Many users on one real tritonserver: concurrent streams share the engine's batch and each still gets exactly
the reply it gets alone (greedy), and the running-requests metric shows them running together."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from .conftest import messages, metric_values, stream_events

PROMPTS = [
    "Tell me a story about a lighthouse.",
    "What is two plus two?",
    "Write a haiku about snow.",
    "Name three rivers in Europe.",
]
GREEDY = {"temperature": 0, "max_tokens": 24}


def text_and_end(events: list[dict]) -> tuple[list[dict], str, int]:
    """What a person sees (every event but the usage timings) and how the reply ended."""
    *body, last = events
    assert last["type"] == "complete", events
    return body, last["finish_reason"], last["usage"]["completion_tokens"]


def test_concurrent_streams_each_get_the_reply_they_get_alone(triton_server):
    alone = [text_and_end(stream_events(triton_server.url, messages(p), GREEDY)) for p in PROMPTS]

    peak, done = [0.0], threading.Event()

    def watch_running():
        while not done.is_set():
            peak[0] = max(peak[0], sum(metric_values(triton_server, "kubrick_requests_running").values()))
            done.wait(0.02)

    watcher = threading.Thread(target=watch_running)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: text_and_end(stream_events(triton_server.url, messages(p), GREEDY)), PROMPTS))
    finally:
        done.set()
        watcher.join()

    assert together == alone
    assert peak[0] >= 2  # they ran in one batch, not one after another
