#!/usr/bin/env python
"""What rendering a prompt costs the engine thread: Harmony rendering (openai-harmony) of bench_serving.py's
three prompt sizes, ms each, and how much of its speed a Python thread keeps while another thread renders in a
loop (1.0: the render lets the interpreter lock go; about 0.5 or less: it holds it).

The scheduler renders up to PREPARE_PER_STEP waiting prompts a step on the engine thread (scheduler.py).

  python scripts/bench_render.py          # CPU only; no model
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_serving  # noqa: E402

from kubrick.engine import harmony  # noqa: E402
from kubrick.engine.api import Message  # noqa: E402


def render_ms(messages: list[Message], repeats: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        harmony.render_prompt(messages)
    return (time.perf_counter() - start) / repeats * 1e3


def spin(seconds: float) -> int:
    """Loop iterations of pure Python in `seconds`."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n


def share_beside_rendering(messages: list[Message], seconds: float = 1.0) -> float:
    alone = spin(seconds)
    stop = threading.Event()

    def render_loop():
        while not stop.is_set():
            harmony.render_prompt(messages)

    renderer = threading.Thread(target=render_loop)
    renderer.start()
    try:
        beside = spin(seconds)
    finally:
        stop.set()
        renderer.join()
    return beside / alone


def main() -> None:
    harmony.encoding()  # load the vocabulary first
    longest = None
    for k, (name, _) in enumerate(bench_serving.PROMPT_SIZES):
        _, prompt, _ = bench_serving.planned_request(k, 512)
        messages = [Message("user", prompt)]
        tokens = len(harmony.render_prompt(messages))
        print(f"{name:6s} prompt: {tokens:5d} tokens, rendered in {render_ms(messages):.2f} ms")
        longest = messages
    print(f"a Python thread beside one rendering the long prompt in a loop keeps {share_beside_rendering(longest):.2f} "
          "of its speed")


if __name__ == "__main__":
    main()
