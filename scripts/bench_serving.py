#!/usr/bin/env python
"""Serving benchmark: concurrent streaming clients over HTTP generate_stream against the real Triton server.

For each concurrency level in turn (same server), C clients each send --requests requests one after another.
Per level it reports output tokens/s (completion tokens of all replies / wall time from the first request sent
to the last reply done), time to first token p50/p99 (request sent -> first reasoning or answer text),
inter-token latency p50/p99 (gaps between streamed text events; the engine sends one event per decoded token
that yields text), the engine's own TTFT from each reply's usage (prefill -> first sampled token, without
queueing or HTTP) and the slowest client (its output tokens and the time from its first request to its last
reply: the level's wall time, since a client's requests run one after another). Requests that fail are
counted and reported; they never stop the run.

The workload mix is fixed and deterministic. Request k of a level (numbered round by round: the first requests
of all clients are 0..C-1, their second ones C..2C-1, ...):
  * prompt size = k % 3: short (~30 tokens of user text: one question), medium (~240: the question plus a
    fixed 53-token paragraph repeated 4 times) or long (~970: the paragraph 18 times);
  * max_tokens = (128, 256, 512)[(k + k // 3) % 3], capped by --max-tokens (so 9 consecutive requests cover
    all 9 prompt/output pairs, and each group 3j, 3j+1, 3j+2 all prompt sizes and all output lengths);
  * every prompt starts with "Level L, request k." (L: the level's place in --concurrency) so no two requests
    of the run share a prefix beyond the chat template's system message (prefix reuse does not flatter the
    figures); greedy unless --temperature (and --top-p) say otherwise, seed 0.
With random weights the model never stops early, so a reply is max_tokens long; its client TTFT includes the
engine holding back up to 32 tokens while it waits for a Harmony header the random model never writes.

  python scripts/bench_serving.py --concurrency 1,8,32,64,128 --requests 2 --checkpoint /tmp/ck20 \\
      --device cuda:0 --context-length 4096 --record serving.md --json serving.json
  python scripts/bench_serving.py --url http://127.0.0.1:8000 --clients 4 --requests 3 --max-tokens 128
  python scripts/bench_serving.py --clients 4      # starts its own server on the embedded default model, cpu

Clients run as threads spread over --processes worker processes (default: up to 8, half the CPUs), so one
Python interpreter's lock does not add to the measured latencies when many streams are open.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from httpx_sse import EventSource  # SSE line splitting: httpx's iter_lines also splits on U+2028 & co.

MODEL = "llm_decoupled"
QUESTION = "Explain, in plain words for a curious child, how a bicycle stays upright while it moves. "
PARAGRAPH = (
    "Here is the plan for the week: on Monday the team reviews the open issues and picks the three that matter "
    "most; on Tuesday and Wednesday everyone writes code and tests for them; on Thursday we measure what changed; "
    "on Friday we write down what we learned. "
)
PROMPT_SIZES = (("short", 0), ("medium", 4), ("long", 18))  # (name, paragraph repeats)
OUTPUT_LENGTHS = (128, 256, 512)
MIX = (
    "request k (round by round over the clients): prompt short/medium/long (~30/~240/~970 tokens of user text: "
    "a question plus a fixed paragraph repeated 0/4/18 times) by k % 3, max_tokens (128, 256, 512)"
    "[(k + k // 3) % 3] capped at {cap}; each prompt starts with its level and request number (no shared "
    "prefix beyond the system message); {sampling}, seed 0; --requests {requests} per client, one after another"
)


def planned_request(k: int, cap: int, level: int = 0) -> tuple[str, str, int]:
    """(size name, prompt, max_tokens) of request k of level `level`: the fixed mix in the module docstring."""
    name, repeats = PROMPT_SIZES[k % len(PROMPT_SIZES)]
    prompt = f"Level {level}, request {k}. {QUESTION}{PARAGRAPH * repeats}What would you answer?"
    return name, prompt, min(OUTPUT_LENGTHS[(k + k // 3) % len(OUTPUT_LENGTHS)], cap)


def parse_levels(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; ValueError with a sentence a person can act on."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--concurrency takes whole numbers separated by commas, like 1,8,32; not {text!r}") from None
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"--concurrency needs one or more client counts of at least 1, like 1,8,32; not {text!r}")
    return levels


@dataclass
class Result:
    sent: float = 0.0  # time.perf_counter(): CLOCK_MONOTONIC, the same clock in every process on Linux
    done: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_ttft: float | None = None  # the engine's own: request start -> first sampled token (no queue, no HTTP)
    engine_rate: float | None = None  # the engine's own decode tokens/s for this request
    error: str | None = None
    client: int = -1  # which client of the level sent it (its requests run one after another)


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int, sampling: dict) -> Result:
    """One streamed request (`sampling`: temperature, top_p); any failure (HTTP, connection, a bad event, an
    error event) lands in .error."""
    body = {
        "text_input": json.dumps([{"role": "user", "content": prompt}]),
        "parameters": {"streaming": True, "max_tokens": max_tokens, **sampling, "seed": 0},
    }
    result = Result()
    result.sent = last = time.perf_counter()
    try:
        _stream(client, url, body, result, last)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
        result.error = f"{type(err).__name__}: {err}"[:300]
    result.done = time.perf_counter()
    if result.error is None and result.completion_tokens == 0 and result.ttft is None:
        result.error = "the stream ended without text or a complete event"
    return result


def _stream(client: httpx.Client, url: str, body: dict, result: Result, last: float) -> None:
    with client.stream("POST", f"{url}/v2/models/{MODEL}/generate_stream", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:200]}"
            return
        for sse in EventSource(response).iter_sse():
            payload = json.loads(sse.data)
            if "error" in payload:
                result.error = str(payload["error"])[:300]
                return
            event = json.loads(payload["text_output"])
            now = time.perf_counter()
            if event["type"] in ("chunk", "reasoning"):
                if result.ttft is None:
                    result.ttft = now - result.sent
                else:
                    result.gaps.append(now - last)
                last = now
            elif event["type"] == "complete":
                usage = event["usage"]
                result.prompt_tokens = usage.get("prompt_tokens", 0)
                result.completion_tokens = usage["completion_tokens"]
                result.engine_ttft = usage.get("time_to_first_token_s")
                result.engine_rate = usage.get("tokens_per_s")
            elif event["type"] == "error":
                result.error = str(event["content"])[:300]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _clients(url: str, indices: list[int], clients: int, requests: int, cap: int, sampling: dict,
             level: int) -> list[dict]:
    """The clients `indices` of a level as threads (in this process); their results as plain dicts."""
    sys.setswitchinterval(0.0005)  # a thread woken by its socket waits less for the interpreter lock
    results: list[dict] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(30.0, read=600.0)) as client:
            for i in range(requests):
                _, prompt, max_tokens = planned_request(i * clients + index, cap, level)
                result = one_request(client, url, prompt, max_tokens, sampling)
                result.client = index
                with lock:
                    results.append(asdict(result))

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run(url: str, clients: int, requests: int, max_tokens: int, sampling: dict, processes: int = 1,
        level: int = 0) -> dict:
    """One concurrency level (`level`: its place in the run): `clients` streams of `requests` requests each; the
    figures as a dict."""
    with httpx.Client(timeout=600) as client:  # the first request pays one-time costs
        one_request(client, url, "warm up", 4, {"temperature": 0.0})
    processes = max(1, min(processes, clients))
    groups = [list(range(p, clients, processes)) for p in range(processes)]
    if processes == 1:
        raw = _clients(url, groups[0], clients, requests, max_tokens, sampling, level)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            jobs = pool.starmap_async(_clients, [(url, g, clients, requests, max_tokens, sampling, level) for g in groups])
            raw = [r for group in jobs.get() for r in group]
    return summarize([Result(**r) for r in raw], clients, max_tokens)


def summarize(results: list[Result], clients: int, cap: int) -> dict:
    errors = [r.error for r in results if r.error]
    ok = [r for r in results if not r.error]
    wall = (max(r.done for r in results) - min(r.sent for r in results)) if results else 0.0
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.completion_tokens for r in ok)
    # A client's requests run one after another, so the level lasts as long as its slowest client: with few
    # requests a client the level's tok/s is that client's chain of tokens, not the engine's rate alone.
    spans: dict[int, tuple[float, float, int]] = {}
    for r in results:
        first, last, n = spans.get(r.client, (r.sent, r.done, 0))
        spans[r.client] = (min(first, r.sent), max(last, r.done), n + (0 if r.error else r.completion_tokens))
    slowest = max(spans.values(), key=lambda s: s[1] - s[0], default=(0.0, 0.0, 0))
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "max_tokens_cap": cap,
        "wall_s": wall,
        "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else float("nan"),
        "completion_tokens": tokens,
        "output_tok_per_s": tokens / wall if wall else float("nan"),
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "engine_ttft_p50_ms": percentile([r.engine_ttft for r in ok if r.engine_ttft is not None], 50) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
        # What one stream sees once it is streaming: text events a second between its first and last event.
        "stream_tok_per_s_p50": percentile([len(r.gaps) / sum(r.gaps) for r in ok if len(r.gaps) > 1 and sum(r.gaps) > 0], 50),
        "engine_stream_tok_per_s_p50": percentile([r.engine_rate for r in ok if r.engine_rate], 50),
        "slowest_client_s": slowest[1] - slowest[0],
        "slowest_client_tokens": slowest[2],
    }


# --- the server this script (and bench_multiturn.py) starts itself -------------------------------------------

SETTINGS = ("KUBRICK_MAX_BATCH", "KUBRICK_STEP_TOKENS", "KUBRICK_KV_CACHE_MEMORY", "KUBRICK_KV_BLOCK_SIZE",
            "KUBRICK_PREFIX_CACHE", "KUBRICK_ENGINE_IMPL")


def add_server_options(parser: argparse.ArgumentParser, context_length: int | None) -> None:
    parser.add_argument("--checkpoint", type=Path, help="for the server this script starts (default: the "
                        "embedded default model)")
    parser.add_argument("--device", default="cpu", help="TRITON_DEVICE of that server: cpu, cuda, cuda:0 ... "
                        "(default cpu)")
    parser.add_argument("--context-length", type=int, default=context_length, help="for that server")
    parser.add_argument("--server-log", type=Path, help="copy that server's tritonserver log here when it stops")
    parser.add_argument("--server-cpus", help="run that server (not the clients) on these CPUs only, like 0,1 or "
                        "0-3: a slow or busy host on purpose (its Python threads set the streams' latency)")


def parse_cpus(text: str) -> set[int]:
    """'0,1' or '0-3,8' -> {0, 1} / {0, 1, 2, 3, 8}; ValueError with an example otherwise."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        cpus = set()
    if not cpus or min(cpus) < 0:
        raise ValueError(f"--server-cpus takes CPU numbers like 0,1 or 0-3, not {text!r}")
    return cpus


def check_server_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a folder; write one with "
                     "`python -m kubrick.cli make-checkpoint DIR --preset 20b`")
    if args.server_cpus is not None:
        try:
            args.server_cpus = parse_cpus(args.server_cpus)
        except ValueError as err:
            parser.error(str(err))
        here = os.sched_getaffinity(0)
        if not args.server_cpus <= here:
            missing = ",".join(map(str, sorted(args.server_cpus - here)))
            parser.error(f"--server-cpus {missing}: not among the CPUs this process may use ({min(here)}-{max(here)})")


def start_own_server(context_length: int | None, checkpoint: Path | None = None, device: str = "cpu",
                     cpus: set[int] | None = None):
    """A ready server on free loopback ports (what `kubrick serve` would start); the embedded default model
    unless a checkpoint is given. KUBRICK_* settings in this environment reach the engine. cpus: the CPUs the
    server's processes may run on (they inherit this process's affinity, set for the start only); this process
    and its clients keep to the others."""
    from kubrick.server.process import start_local_server
    from kubrick.server.serve import shipped_model_repository

    if checkpoint is None:
        from kubrick.server.default_model import ensure_embedded_default

        checkpoint, _ = ensure_embedded_default()
    mine = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        return start_local_server(Path(checkpoint), shipped_model_repository(), device=device,
                                  context_length=context_length)
    finally:
        others = mine - cpus if cpus else mine
        os.sched_setaffinity(0, others or mine)  # the clients: the other CPUs (all, if the server has every one)


def start_from_args(args: argparse.Namespace, script: str, note: str = ""):
    """The server of --checkpoint/--device/--context-length, or None after one line saying why it did not start."""
    from kubrick.errors import KubrickError

    print(f"starting a server on {args.device}{note} ...", file=sys.stderr, flush=True)
    try:
        return start_own_server(args.context_length, args.checkpoint, args.device, args.server_cpus)
    except KubrickError as err:
        print(f"{script}: the server did not start: {err}", file=sys.stderr)
        return None


def stop_server(server, log_copy: Path | None) -> None:
    """Stop the server, keeping a copy of its log first when asked."""
    if log_copy is not None:
        try:
            log_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(server.log_path, log_copy)
        except OSError as err:
            print(f"could not copy the server log to {log_copy}: {err}", file=sys.stderr)
    server.stop()


def describe_server(server, checkpoint: Path | None, device: str, context_length: int | None,
                    cpus: set[int] | None = None) -> str:
    """Which model on which device, with the engine's own start line (engine, context, KV cache) if logged."""
    model = f"checkpoint {checkpoint}" if checkpoint else "embedded default model"
    where = device_name(device)
    summary = server.model_summary() if hasattr(server, "model_summary") else None
    settings = ", ".join(f"{k}={os.environ[k]}" for k in SETTINGS if os.environ.get(k)) or "engine defaults"
    text = f"own server, {model} on {where}, context {context_length or 'default'}; settings: {settings}"
    if cpus:
        text += f"; the server on CPUs {','.join(map(str, sorted(cpus)))} only"
    return text + (f"  \nServer: {summary}" if summary else "")


def device_name(device: str) -> str:
    """'cuda:0 (NVIDIA H100 80GB HBM3)' or 'cpu (x86_64, 16 CPUs)'."""
    if not device.startswith("cuda"):
        return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)"
    index = device.partition(":")[2] or "0"
    try:
        name = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=name", "--format=csv,noheader"],
                              check=False, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        name = ""
    return f"{device} ({name or 'GPU name unknown'})"


def stop_on_sigterm() -> None:
    """`timeout` sends SIGTERM: unwind (the finally blocks stop the server, which runs in its own session)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# --- recording -----------------------------------------------------------------------------------------------

HEADER = (
    "| clients | requests | errors | prompt tokens (mean) | output tokens | wall s | output tok/s | TTFT p50 ms "
    "| TTFT p99 ms | engine TTFT p50 ms | ITL p50 ms | ITL p99 ms | one stream tok/s p50 | engine's own p50 "
    "| slowest client: tokens in s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def heading(target: str, mix: str) -> str:
    return (
        f"\n## Serving, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()}\n\n"
        f"Command: `python {' '.join(sys.argv)}`  \nTarget: {target}  \nMix: {mix}  \n"
        f"Load average (1 min) at the start: {os.getloadavg()[0]:.2f} (other work on the machine skews CPU figures)"
        "\n\n" + HEADER
    )


def row(f: dict) -> str:
    return (
        f"| {f['clients']} | {f['requests']} | {f['errors']} | {f['prompt_tokens_mean']:.0f} | "
        f"{f['completion_tokens']} | {f['wall_s']:.1f} | {f['output_tok_per_s']:.1f} | {f['ttft_p50_ms']:.1f} | "
        f"{f['ttft_p99_ms']:.1f} | {f['engine_ttft_p50_ms']:.1f} | {f['itl_p50_ms']:.1f} | {f['itl_p99_ms']:.1f} | "
        f"{f['stream_tok_per_s_p50']:.1f} | {f['engine_stream_tok_per_s_p50']:.1f} | "
        f"{f['slowest_client_tokens']} in {f['slowest_client_s']:.1f} |\n"
    )


def json_safe(figures: dict) -> dict:
    """NaN (a percentile of nothing, e.g. no inter-token gaps in a one-token reply) as null: strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in figures.items()}


def append(path: Path, text: str, title: str = "# Serving benchmark (scripts/bench_serving.py)\n") -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write((title if new else "") + text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; default: start one (see --checkpoint, --device)")
    parser.add_argument("--concurrency", help="client counts to run in turn, like 1,8,32,64,128")
    parser.add_argument("--clients", type=int, help="one level of concurrent streaming clients (default 4)")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=512, help="caps the mix's output lengths (128/256/512)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's bound (with --temperature > 0)")
    parser.add_argument("--processes", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                        help="worker processes the clients are spread over (default: up to 8, half the CPUs)")
    add_server_options(parser, context_length=None)
    parser.add_argument("--record", type=Path, help="append a Markdown table (a row per level) and the command")
    parser.add_argument("--json", type=Path, help="write the figures here: a list of per-level dicts")
    args = parser.parse_args()
    if args.concurrency and args.clients:
        parser.error("give --concurrency (a list) or --clients (one level), not both")
    try:
        levels = parse_levels(args.concurrency) if args.concurrency else [args.clients or 4]
    except ValueError as err:
        parser.error(str(err))
    if args.requests < 1 or args.max_tokens < 1 or args.processes < 1:
        parser.error("--requests, --max-tokens and --processes must be at least 1")
    if not 0 < args.top_p <= 1 or args.temperature < 0:
        parser.error("--top-p must be in (0, 1] and --temperature at least 0")
    if args.url and (args.checkpoint or args.server_log or args.server_cpus):
        parser.error("--checkpoint, --server-log and --server-cpus are for the server this script starts; leave out "
                     "--url")
    check_server_options(parser, args)
    stop_on_sigterm()

    server, url, figures = None, args.url, []
    try:
        if url is None:
            server = start_from_args(args, "bench_serving")
            if server is None:
                return 1
            url = server.url
            target = describe_server(server, args.checkpoint, args.device, args.context_length, args.server_cpus)
        else:
            target = url
        drawn = f"temperature {args.temperature:g}" + (f", top_p {args.top_p:g}" if args.top_p < 1 else "")
        mix = MIX.format(cap=args.max_tokens, requests=args.requests,
                         sampling=drawn if args.temperature > 0 else "greedy")
        if args.record:
            append(args.record, heading(target, mix))
        for level, clients in enumerate(levels):
            sampling = {"temperature": args.temperature, "top_p": args.top_p}
            f = run(url.rstrip("/"), clients, args.requests, args.max_tokens, sampling, args.processes, level)
            figures.append(f)
            print(json.dumps(json_safe(f)), flush=True)
            if args.record:
                append(args.record, row(f))
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps([json_safe(f) for f in figures], indent=2) + "\n")
    finally:
        if server is not None:
            stop_server(server, args.server_log)
    failed = [f for f in figures if f["errors"]]
    if args.record and failed:
        append(args.record, "\n" + "".join(f"Errors at {f['clients']} clients: {f['errors']}, the first: "
                                           f"{f['first_error']}\n" for f in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
