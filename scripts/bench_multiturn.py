#!/usr/bin/env python
"""Multi-turn benchmark: time to first token per turn of one conversation whose history grows, through the real
Triton server over HTTP generate_stream, with the engine's prefix reuse on and then off (KUBRICK_PREFIX_CACHE=0).

Each turn re-sends the whole history (as the chat does): the user's message is a fixed paragraph, the
assistant's reply is what the model said. With prefix reuse the engine finds the earlier turns' blocks in its
paged KV cache and computes only the new tail, so TTFT should stay flat as the history grows. The script starts
its own server twice (KUBRICK_PREFIX_CACHE=1, then 0), on the embedded default model or --checkpoint, on --device.

  python scripts/bench_multiturn.py --turns 6 --record /tmp/kubrick-bench/batching.md
  python scripts/bench_multiturn.py --checkpoint /tmp/ck20 --device cuda:0 --context-length 4096 --turns 6
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
from httpx_sse import EventSource  # SSE line splitting: httpx's iter_lines also splits on U+2028 & co.

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import (
    MODEL,
    add_server_options,
    append,
    check_server_options,
    describe_server,
    start_from_args,
    stop_on_sigterm,
    stop_server,
)

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
        for sse in EventSource(response).iter_sse():
            payload = json.loads(sse.data)
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
    add_server_options(parser, context_length=8192)
    parser.add_argument("--record", type=Path, help="append the Markdown table with the command to this file")
    args = parser.parse_args()
    if args.turns < 1 or args.max_tokens < 1:
        parser.error("--turns and --max-tokens must be at least 1")
    check_server_options(parser, args)
    stop_on_sigterm()

    results, target = {}, ""
    for label, flag in (("reuse on", "1"), ("reuse off", "0")):
        os.environ["KUBRICK_PREFIX_CACHE"] = flag  # the server this script starts inherits it
        server = start_from_args(args, "bench_multiturn", f", KUBRICK_PREFIX_CACHE={flag}")
        if server is None:
            return 1
        log_copy = args.server_log
        if log_copy is not None:  # one log per server: NAME-reuse-on.log, NAME-reuse-off.log
            log_copy = log_copy.with_name(f"{log_copy.stem}-{label.replace(' ', '-')}{log_copy.suffix or '.log'}")
        try:
            target = target or describe_server(server, args.checkpoint, args.device, args.context_length,
                                               args.server_cpus)
            results[label] = conversation(server.url, args.turns, args.max_tokens)
        except httpx.HTTPError as err:
            print(f"bench_multiturn: a request failed ({label}): {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        finally:
            stop_server(server, log_copy)
    lines = [
        "| turn | prompt tokens | TTFT ms, reuse on | engine TTFT ms, reuse on | TTFT ms, reuse off | engine TTFT ms, reuse off |",
        "|---|---|---|---|---|---|",
    ]
    for n, (on, off) in enumerate(zip(results["reuse on"], results["reuse off"]), 1):
        lines.append(f"| {n} | {on[0]} | {on[1] * 1e3:.0f} | {on[2] * 1e3:.0f} | {off[1] * 1e3:.0f} | {off[2] * 1e3:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        append(
            args.record,
            f"\n## Multi-turn TTFT, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
            f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f})\n\nCommand: `python {' '.join(sys.argv)}`  \n"
            f"Target: {target}  \nRuns: one server with KUBRICK_PREFIX_CACHE=1, then one with 0; greedy; each user "
            f"turn is a fixed paragraph repeated 3 times, replies up to {args.max_tokens} tokens\n\n" + table + "\n",
            title="# Multi-turn benchmark (scripts/bench_multiturn.py)\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
