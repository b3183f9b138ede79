#!/usr/bin/env python
"""Measure the reference gpt-oss model: prefill and decode tokens/s, and the memory its weights take.

Batch 1, random weights of the preset's exact shape (experts packed as MXFP4, as loaded from a checkpoint):

    python scripts/bench_engine.py                                  # tiny on CPU
    python scripts/bench_engine.py --preset 20b --device cuda       # writes a random 20b checkpoint to a temp dir
    python scripts/bench_engine.py --preset 20b --device cuda --checkpoint /data/ck20b   # reuse or create it there

Prints a short table and writes the figures as JSON (--json, default bench_engine.json in the current folder).
It needs torch and safetensors only (no Harmony, no vocabulary): tokens are random ids.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubrick.engine.checkpoint import load_checkpoint  # noqa: E402
from kubrick.engine.make_checkpoint import make_checkpoint  # noqa: E402
from kubrick.engine.model import Transformer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: Transformer, device: torch.device, prompt_tokens: int, decode_tokens: int, chunk: int) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab - 1000, (prompt_tokens + decode_tokens,), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    warm = model.new_cache(64)  # first calls pay for allocator growth and kernel selection
    model(ids[:16], warm)
    model(ids[16:17], warm)
    del warm

    cache = model.new_cache(prompt_tokens + decode_tokens + 1)
    sync(device)
    start = time.perf_counter()
    for part in torch.split(ids[:prompt_tokens], chunk):
        logits = model(part, cache)
    sync(device)
    prefill_s = time.perf_counter() - start

    token = logits[-1].argmax()
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(token.view(1), cache)[-1].argmax()  # greedy: the next step waits for this one, as in serving
    sync(device)
    decode_s = time.perf_counter() - start
    return {
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_s": decode_s,
        "decode_tok_s": decode_tokens / decode_s,
        "decode_ms_per_token": 1000 * decode_s / decode_tokens,
        "kv_cache_bytes": cache.nbytes(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "20b", "120b"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder: used if it holds one, else written there")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill step (as the engine does)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=Path("bench_engine.json"), help="where to write the figures")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_engine: no CUDA GPU visible; use --device cpu", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="kubrick-bench-") as tmp:
        folder = args.checkpoint or Path(tmp) / f"random-{args.preset}"
        made_s = None
        if not (folder.exists() and any(folder.iterdir())):
            start = time.perf_counter()
            make_checkpoint(folder, layout="original", preset=args.preset, seed=0)
            made_s = time.perf_counter() - start
            print(f"wrote a random {args.preset} checkpoint to {folder} in {made_s:.0f} s", file=sys.stderr)
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        config, weights = load_checkpoint(folder, device)
        model = Transformer(config, weights)
        del weights
        sync(device)
        load_s = time.perf_counter() - start
        result = {
            "preset": args.preset,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "checkpoint_write_s": made_s,
            "load_s": load_s,
            "weights_bytes": model.weights_bytes(),
        }
        if device.type == "cuda":
            result["cuda_weights_allocated_bytes"] = torch.cuda.memory_allocated(device) - before
        with torch.inference_mode():
            result.update(measure(model, device, args.prompt_tokens, args.decode_tokens, args.prefill_chunk))
        if device.type == "cuda":
            result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)

    args.json.write_text(json.dumps(result, indent=2) + "\n")
    gb = 1e9
    rows = [
        ("model", f"{args.preset} (reference, batch 1) on {result['device']} ({result['device_name']})"),
        ("weights in memory", f"{result['weights_bytes'] / gb:.2f} GB (experts packed MXFP4)"),
        (f"prefill {args.prompt_tokens} tokens", f"{result['prefill_tok_s']:.1f} tok/s ({result['prefill_s']:.2f} s)"),
        (f"decode {args.decode_tokens} tokens", f"{result['decode_tok_s']:.2f} tok/s ({result['decode_ms_per_token']:.1f} ms/token)"),
        ("KV cache", f"{result['kv_cache_bytes'] / 1e6:.1f} MB for {args.prompt_tokens + args.decode_tokens + 1} tokens"),
    ]
    if "cuda_peak_allocated_bytes" in result:
        rows.append(("GPU memory peak", f"{result['cuda_peak_allocated_bytes'] / gb:.2f} GB"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"(figures in {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
