#!/usr/bin/env python
"""The engine thread's host work for one decode step over the paged KV cache, without a model or a GPU.

Continuous batching does some Python every step before the GPU runs it: `PagedKVCache.prepare` for each
sequence (blocks for the new token, block-table rows), `PagedStep.build` (every row's token, position and cache
rows, the tables the kernels read) and `advance` (key completed blocks, release window blocks). In the server
that Python holds the interpreter lock the response thread needs to stream text, so it counts twice. This times
the three for N sequences of a given length each decoding one token a step, on gpt-oss-20b's layer pattern
(24 layers, every other one sliding over 128 positions) and the engine's 16-position blocks.

    python scripts/bench_host_step.py                      # 1, 64 and 128 sequences of 500 tokens
    python scripts/bench_host_step.py --sequences 64 --length 2000 --steps 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubrick.engine.fast_model import PagedStep  # noqa: E402
from kubrick.engine.paged_cache import PagedKVCache  # noqa: E402

LAYERS, WINDOW, BLOCK = 24, 128, 16


def time_steps(sequences: int, length: int, steps: int) -> dict[str, float]:
    """Milliseconds a step in prepare, build and advance, averaged over `steps` decode steps."""
    per_seq = -(-(length + steps + 1) // BLOCK)
    window_span = -(-(WINDOW + length) // BLOCK) + 2  # what admission reserves when the prompt is one chunk
    cache = PagedKVCache([i % 2 == 0 for i in range(LAYERS)], WINDOW, kv_heads=1, head_dim=8,
                         num_blocks=sequences * per_seq + 8, window_blocks=sequences * window_span,
                         block_size=BLOCK)
    seqs = []
    for k in range(sequences):  # distinct prompts (no shared prefix), prefilled as one chunk each
        seq = cache.admit([k * length + i for i in range(length)], length + steps + 1, length)
        cache.prepare(seq, seq.tokens, prefill=True)
        cache.advance(seq, length)
        seqs.append(seq)
    spent = {"prepare": 0.0, "build": 0.0, "advance": 0.0}
    for _ in range(steps):
        segments = [(seq, [1]) for seq in seqs]
        start = time.perf_counter()
        for seq, part in segments:
            cache.prepare(seq, part, prefill=False)
        built = time.perf_counter()
        PagedStep.build(segments, cache, width=per_seq)
        advancing = time.perf_counter()
        for seq, _ in segments:
            cache.advance(seq, 1)
        done = time.perf_counter()
        spent["prepare"] += built - start
        spent["build"] += advancing - built
        spent["advance"] += done - advancing
    return {name: seconds / steps * 1e3 for name, seconds in spent.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", default="1,64,128", help="comma-separated batch sizes (default 1,64,128)")
    parser.add_argument("--length", type=int, default=500, help="tokens each sequence holds before (default 500)")
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed (default 200)")
    args = parser.parse_args()
    try:
        batches = [int(n) for n in args.sequences.split(",")]
    except ValueError:
        parser.error(f"--sequences takes whole numbers separated by commas, like 1,64; not {args.sequences!r}")
    if any(n < 1 for n in batches) or args.length < 1 or args.steps < 1:
        parser.error("--sequences, --length and --steps must be at least 1")
    for n in batches:
        ms = time_steps(n, args.length, args.steps)
        print(f"{n:4d} sequences of {args.length} tokens: prepare {ms['prepare']:.3f} ms, build {ms['build']:.3f} ms, "
              f"advance {ms['advance']:.3f} ms a step ({sum(ms.values()):.3f} in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
