#!/usr/bin/env python
"""Multi-turn benchmark: time to first token per turn of one conversation whose history grows, through the real
Triton server over HTTP generate_stream, with the engine's prefix reuse on and then off (KUBRICK_PREFIX_CACHE=0).

Each turn re-sends the whole history (as the chat does): the user's message is a fixed paragraph, the
assistant's reply is what the model said. With prefix reuse the engine finds the earlier turns' blocks in its
paged KV cache and computes only the new tail, so TTFT should stay flat as the history grows.

  python scripts/bench_multiturn.py --turns 6 --record /tmp/kubrick-bench/batching.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import MODEL, start_own_server  # noqa: E402

PARAGRAPH = (
    "Here is more about the trip: we leave on a Friday, drive four hours into the mountains, sleep in a hut, "
    "walk two ridges on Saturday and come back on Sunday evening. What should we pack for this part, and why? "
)


def turn(client: httpx.Client, url: str, history: list[dict], max_tokens: int) -> tuple[float, float, int, str]:
    """(client TTFT s, engine TTFT s, prompt tokens, answer text) for one request."""
    body = {
        "text_input": json.dumps(history),
        "parameters": {"streaming": True, "max_tokens": max_tokens, "temperature": 0, "seed": 0},
    }
    sent, ttft, engine_ttft, prompt, answer = time.perf_counter(), None, float("nan"), 0, []
    with client.stream("POST", f"{url}/v2/models/{MODEL}/generate_stream", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = json.loads(line[5:])
            if "error" in payload:
                raise SystemExit(f"server error: {payload['error']}")
            event = json.loads(payload["text_output"])
            if event["type"] in ("chunk", "reasoning") and ttft is None:
                ttft = time.perf_counter() - sent
            if event["type"] == "chunk":
                answer.append(event["content"])
            if event["type"] == "complete":
                engine_ttft = event["usage"]["time_to_first_token_s"]
                prompt = event["usage"]["prompt_tokens"]
            if event["type"] == "error":
                raise SystemExit(f"error event: {event['content']}")
    return ttft if ttft is not None else time.perf_counter() - sent, engine_ttft, prompt, "".join(answer) or "ok"


def conversation(url: str, turns: int, max_tokens: int) -> list[tuple[int, float, float]]:
    rows, history = [], []
    with httpx.Client(timeout=httpx.Timeout(10.0, read=600.0)) as client:
        turn(client, url, [{"role": "user", "content": "warm up"}], 2)
        for n in range(turns):
            history.append({"role": "user", "content": PARAGRAPH * 3 + f"(turn {n + 1})"})
            ttft, engine_ttft, prompt, answer = turn(client, url, history, max_tokens)
            history.append({"role": "assistant", "content": answer})
            rows.append((prompt, ttft, engine_ttft))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=8192)
    parser.add_argument("--record", type=Path, help="append the Markdown table with the command to this file")
    args = parser.parse_args()
    results = {}
    for label, flag in (("reuse on", "1"), ("reuse off", "0")):
        os.environ["KUBRICK_PREFIX_CACHE"] = flag  # the server this script starts inherits it
        server = start_own_server(args.context_length)
        try:
            results[label] = conversation(server.url, args.turns, args.max_tokens)
        finally:
            server.stop()
    lines = [
        "| turn | prompt tokens | TTFT ms, reuse on | engine TTFT ms, reuse on | TTFT ms, reuse off | engine TTFT ms, reuse off |",
        "|---|---|---|---|---|---|",
    ]
    for n, (on, off) in enumerate(zip(results["reuse on"], results["reuse off"]), 1):
        lines.append(f"| {n} | {on[0]} | {on[1] * 1e3:.0f} | {on[2] * 1e3:.0f} | {off[1] * 1e3:.0f} | {off[2] * 1e3:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        with args.record.open("a") as out:
            out.write(
                f"\n## Multi-turn TTFT, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
                f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f})\n\nCommand: `python {' '.join(sys.argv)}` "
                "(own server, embedded default model, cpu, greedy)\n\n" + table + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
