#!/usr/bin/env python
"""Serving benchmark: N concurrent streaming clients over HTTP generate_stream against a Triton server.

Reports output tokens/s (completion tokens of all replies / wall time), time to first token p50/p99 (request
sent → first reasoning or answer text) and inter-token latency p50/p99 (gaps between streamed text events;
the engine sends one event per decoded token that yields text), plus the engine's own TTFT from each reply's
usage (prefill → first sampled token, without queueing or HTTP).

  python scripts/bench_serving.py --url http://127.0.0.1:8000 --clients 4 --requests 3 --max-tokens 128
  python scripts/bench_serving.py --clients 4      # starts its own server on the embedded default model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = "llm_decoupled"
PROMPTS = [
    "Explain how a bicycle stays upright.",
    "Write a short poem about the sea at night.",
    "What is the difference between a list and a tuple in Python?",
    "Give me three ideas for a rainy Sunday.",
]


@dataclass
class Result:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    engine_ttft: float | None = None  # the engine's own: request start → first sampled token (no queue, no HTTP)
    error: str | None = None


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int, temperature: float) -> Result:
    body = {
        "text_input": json.dumps([{"role": "user", "content": prompt}]),
        "parameters": {"streaming": True, "max_tokens": max_tokens, "temperature": temperature, "seed": 0},
    }
    result = Result()
    sent = last = time.perf_counter()
    with client.stream("POST", f"{url}/v2/models/{MODEL}/generate_stream", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:200]}"
            return result
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = json.loads(line[5:])
            if "error" in payload:
                result.error = payload["error"]
                return result
            event = json.loads(payload["text_output"])
            now = time.perf_counter()
            if event["type"] in ("chunk", "reasoning"):
                if result.ttft is None:
                    result.ttft = now - sent
                else:
                    result.gaps.append(now - last)
                last = now
            elif event["type"] == "complete":
                result.completion_tokens = event["usage"]["completion_tokens"]
                result.engine_ttft = event["usage"].get("time_to_first_token_s")
            elif event["type"] == "error":
                result.error = event["content"]
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(url: str, clients: int, requests: int, max_tokens: int, temperature: float) -> dict:
    results: list[Result] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(10.0, read=600.0)) as client:
            for i in range(requests):
                prompt = PROMPTS[(index + i) % len(PROMPTS)]
                result = one_request(client, url, prompt, max_tokens, temperature)
                with lock:
                    results.append(result)

    with httpx.Client(timeout=600) as client:  # the first request pays one-time costs
        one_request(client, url, "warm up", 4, 0.0)
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    ok = [r for r in results if not r.error]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "completion_tokens": tokens,
        "output_tok_per_s": tokens / wall if wall else float("nan"),
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "engine_ttft_p50_ms": percentile([r.engine_ttft for r in ok if r.engine_ttft is not None], 50) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
    }


def start_own_server(context_length: int | None):
    """A server on the embedded default model, on free loopback ports (what `kubrick serve` would start)."""
    from kubrick.server.default_model import ensure_embedded_default
    from kubrick.server.process import start_local_server
    from kubrick.server.serve import shipped_model_repository

    checkpoint, _ = ensure_embedded_default()
    return start_local_server(checkpoint, shipped_model_repository(), context_length=context_length)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; default: start one on the embedded default model")
    parser.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--context-length", type=int, default=None, help="for the server this script starts")
    parser.add_argument("--record", type=Path, help="append a Markdown row with the command to this file")
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        server = start_own_server(args.context_length)
        url = server.url
    try:
        figures = run(url.rstrip("/"), args.clients, args.requests, args.max_tokens, args.temperature)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(figures, indent=2))
    if args.record:
        record(args.record, figures, url if args.url else "own server, embedded default model, cpu")
    return 1 if figures["errors"] else 0


def record(path: Path, f: dict, target: str) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        if new:
            out.write("# Serving benchmark (scripts/bench_serving.py)\n\n")
        out.write(
            f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
            f"({platform.processor() or platform.machine()}, {_cpus()} CPUs)\n\n"
            f"Command: `python {' '.join(sys.argv)}`  \nTarget: {target}  \n"
            f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f} (other work on the machine skews CPU figures)\n\n"
            "| clients | requests | errors | output tok/s | TTFT p50 ms | TTFT p99 ms | engine TTFT p50 ms "
            "| ITL p50 ms | ITL p99 ms |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {f['clients']} | {f['requests']} | {f['errors']} | {f['output_tok_per_s']:.1f} | "
            f"{f['ttft_p50_ms']:.1f} | {f['ttft_p99_ms']:.1f} | {f['engine_ttft_p50_ms']:.1f} | "
            f"{f['itl_p50_ms']:.1f} | {f['itl_p99_ms']:.1f} |\n"
        )


def _cpus() -> int:
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
