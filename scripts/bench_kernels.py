#!/usr/bin/env python
"""Time each Triton kernel at gpt-oss-20b shapes on a CUDA GPU and compare it with its roofline.

Memory-bound kernels (decode) are measured against the device-to-device copy bandwidth measured in the same
run; compute-bound ones (prefill) report TFLOP/s. Every kernel runs over LAYERS distinct weight/cache copies
inside one CUDA graph, so nothing is served from L2 that a real decode step would have to read from HBM.

    python scripts/bench_kernels.py [--sweep] [--sweep-small] [--sweep-gemv] [--sweep-linear] [--sweep-decode]
        [--sweep-tables] [--sweep-w-first] [--sweep-wgmma]
        [--sweep-grouping] [--sweep-rope] [--sweeps-only] [--model] [--json out.json] [--layers 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubrick.engine.kernels._common import block_config  # noqa: E402
from kubrick.engine.kernels.attention import attention_decode, attention_prefill  # noqa: E402
from kubrick.engine.kernels.moe_gemv import moe_gemv  # noqa: E402
from kubrick.engine.kernels import moe_grouped as grouped_module  # noqa: E402
from kubrick.engine.kernels.moe_grouped import group_by_expert, moe_grouped  # noqa: E402
from kubrick.engine.kernels.moe_wgmma import moe_wgmma  # noqa: E402
from kubrick.engine.kernels.rmsnorm import rmsnorm  # noqa: E402
from kubrick.engine.kernels.rope import rope_and_cache  # noqa: E402
from kubrick.engine.kernels.router import router  # noqa: E402
from kubrick.engine.kernels.sampling import sample  # noqa: E402

HIDDEN, INTER, EXPERTS, TOPK = 2880, 2880, 32, 4
Q_HEADS, KV_HEADS, HEAD_DIM, WINDOW = 64, 8, 64, 128
VOCAB = 201_088
BF16 = torch.bfloat16


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 20 copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / sorted(times[2:])[len(times[2:]) // 2]


def time_per_call(calls: list, replays: int = 20) -> float:
    """Seconds per call, with all `calls` (one per layer copy) captured in one CUDA graph and replayed."""
    for call in calls:
        call()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays / len(calls)


def mxfp4_expert_bytes() -> int:
    mlp1 = 2 * INTER * (HIDDEN // 2 + HIDDEN // 32 + 2)  # packed values + scales + bf16 bias
    mlp2 = HIDDEN * (INTER // 2 + INTER // 32 + 2)
    return mlp1 + mlp2


def moe_weights(layers: int):
    def one():
        w1b = torch.randint(0, 256, (EXPERTS, 2 * INTER, HIDDEN // 32, 16), dtype=torch.uint8, device="cuda")
        w1s = torch.randint(118, 125, (EXPERTS, 2 * INTER, HIDDEN // 32), dtype=torch.uint8, device="cuda")
        w2b = torch.randint(0, 256, (EXPERTS, HIDDEN, INTER // 32, 16), dtype=torch.uint8, device="cuda")
        w2s = torch.randint(118, 125, (EXPERTS, HIDDEN, INTER // 32), dtype=torch.uint8, device="cuda")
        b1 = torch.randn(EXPERTS, 2 * INTER, device="cuda", dtype=BF16) * 0.1
        b2 = torch.randn(EXPERTS, HIDDEN, device="cuda", dtype=BF16) * 0.1
        return (w1b, w1s, b1, w2b, w2s, b2)

    return [one() for _ in range(layers)]


def routing(tokens: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.randn(tokens, EXPERTS, device="cuda", generator=gen)
    ids = scores.topk(TOPK, dim=-1).indices.to(torch.int32)
    return ids, torch.softmax(torch.randn(tokens, TOPK, device="cuda", generator=gen), dim=-1)


def bench(layers: int) -> tuple[list[dict], float]:
    bandwidth = copy_bandwidth()
    rows: list[dict] = []

    def add(name, seconds, nbytes=None, flops=None, note=""):
        row = dict(kernel=name, us=seconds * 1e6, note=note)
        if nbytes is not None:
            row.update(bytes=nbytes, gbps=nbytes / seconds / 1e9, pct_copy=100 * nbytes / seconds / bandwidth)
        if flops is not None:
            row.update(tflops=flops / seconds / 1e12)
        rows.append(row)
        print(format_row(row), flush=True)

    experts = moe_weights(layers)
    for tokens in (1, 8, 64):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
        routes = [routing(tokens, seed) for seed in range(layers)]
        unique = sum(int(ids.unique().numel()) for ids, _ in routes) / layers
        nbytes = int(unique * mxfp4_expert_bytes())
        if tokens <= 16:
            sec = time_per_call([lambda r=r, w=w: moe_gemv(x, *r, *w) for r, w in zip(routes, experts)])
            add(f"moe_gemv T={tokens}", sec, nbytes, note=f"{unique:.1f} experts read")
        sec = time_per_call([lambda r=r, w=w: moe_grouped(x, *r, *w) for r, w in zip(routes, experts)])
        add(f"moe_grouped T={tokens}", sec, nbytes, note=f"{unique:.1f} experts read")
    tokens = 2048
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
    routes = [routing(tokens, seed) for seed in range(layers)]
    flops = 2 * tokens * TOPK * (HIDDEN * 2 * INTER + INTER * HIDDEN)
    sec = time_per_call([lambda r=r, w=w: moe_grouped(x, *r, *w) for r, w in zip(routes, experts)], replays=5)
    add(f"moe_grouped T={tokens}", sec, flops=flops, note="prefill")
    del experts

    gate = [(torch.randn(EXPERTS, HIDDEN, device="cuda", dtype=BF16), torch.randn(EXPERTS, device="cuda", dtype=BF16))
            for _ in range(layers)]
    for tokens in (1, 64):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
        sec = time_per_call([lambda g=g: router(x, *g, TOPK) for g in gate])
        add(f"router T={tokens}", sec, EXPERTS * HIDDEN * 2 + tokens * HIDDEN * 2)
    norm_w = torch.randn(HIDDEN, device="cuda")
    for tokens in (1, 2048):
        xs = [torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16) for _ in range(layers)]
        sec = time_per_call([lambda x=x: rmsnorm(x, norm_w) for x in xs])
        add(f"rmsnorm T={tokens}", sec, 2 * tokens * HIDDEN * 2 + HIDDEN * 4)

    qkv_width = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    for tokens in (1, 2048):
        qkvs = [torch.randn(tokens, qkv_width, device="cuda", dtype=BF16) for _ in range(layers)]
        caches = [torch.zeros(4096, KV_HEADS, HEAD_DIM, device="cuda", dtype=BF16) for _ in range(2)]
        positions = torch.arange(tokens, device="cuda")
        cos = torch.randn(tokens, HEAD_DIM // 2, device="cuda")
        sin = torch.randn_like(cos)
        sec = time_per_call([lambda x=x: rope_and_cache(x, cos, sin, positions, *caches, Q_HEADS, KV_HEADS) for x in qkvs])
        add(f"rope_and_cache T={tokens}", sec, tokens * (2 * qkv_width * 2 + HEAD_DIM * 4))

    sinks = torch.randn(Q_HEADS, device="cuda")
    for batch, context, window in ((1, 4096, WINDOW), (1, 4096, 0), (1, 128, 0), (8, 4096, 0), (64, 1024, 0)):
        caches = [(torch.randn(batch, context, KV_HEADS, HEAD_DIM, device="cuda", dtype=BF16),
                   torch.randn(batch, context, KV_HEADS, HEAD_DIM, device="cuda", dtype=BF16)) for _ in range(layers)]
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=BF16)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        span = min(window, context) if window else context
        sec = time_per_call([lambda c=c: attention_decode(q, *c, sinks, lens, window=window) for c in caches])
        nbytes = batch * span * KV_HEADS * HEAD_DIM * 2 * 2 + 2 * q.numel() * 2
        add(f"attn_decode B={batch} ctx={context} window={window}", sec, nbytes)
        del caches
    n_tokens = 2048
    for window in (0, WINDOW):
        q = torch.randn(1, n_tokens, Q_HEADS, HEAD_DIM, device="cuda", dtype=BF16)
        k = torch.randn(1, n_tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=BF16)
        v = torch.randn_like(k)
        pairs = n_tokens * (n_tokens + 1) / 2 if window == 0 else n_tokens * WINDOW
        flops = 4 * Q_HEADS * HEAD_DIM * pairs
        sec = time_per_call([lambda: attention_prefill(q, k, v, sinks, 0, window=window)] * layers, replays=5)
        add(f"attn_prefill T={n_tokens} window={window}", sec, flops=flops, note="prefill")
    bench_sampling(add)
    return rows, bandwidth


def bench_sampling(add, vocab: int = 201_088) -> None:
    """The sampling kernel alone (graph replays), then sample_rows as the scheduler calls it, eagerly: host work,
    the pinned copies of the rows' settings and, with top_p < 1, the top-p bound included."""
    from kubrick.engine.api import SamplingParams
    from kubrick.engine.kernels.nucleus import top_p_cut
    from kubrick.engine.sampler import Sampler, cuts, sample_rows

    for batch in (1, 8, 64):
        logits = torch.randn(batch, vocab, device="cuda", dtype=BF16)
        ones, none = torch.ones(batch, device="cuda"), torch.full((batch,), float("-inf"), device="cuda")
        keys = torch.arange(batch, device="cuda", dtype=torch.int64)
        add(f"sample B={batch} (kernel)", time_per_call([lambda: sample(logits, ones, none, keys)] * 8),
            batch * vocab * 2)
        # The top-p bound: the radix select (kernels/nucleus.py) against the sort it replaced (sampler.cuts)
        top_p, all_ids = torch.full((batch,), 0.9, device="cuda"), torch.full((batch,), float(vocab), device="cuda")
        add(f"top_p_cut B={batch} (radix select)", time_per_call([lambda: top_p_cut(logits, ones, top_p)] * 4),
            10 * batch * vocab * 2, note="ten passes over the row")
        wide = logits.float()  # the scheduler's logits are float32
        add(f"top_p_cut B={batch} fp32 (radix select)", time_per_call([lambda: top_p_cut(wide, ones, top_p)] * 4),
            10 * batch * vocab * 4, note="ten passes over the row")
        add(f"cuts B={batch} (sort, the reference)", time_per_call([lambda: cuts(logits, ones, all_ids, top_p)] * 4),
            batch * vocab * 2)
        for top_p in (1.0, 0.9):
            samplers = [Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=i)) for i in range(batch)]
            for _ in range(3):
                sample_rows(logits, samplers)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                sample_rows(logits, samplers)
            torch.cuda.synchronize()
            add(f"sample_rows B={batch} top_p={top_p}", (time.perf_counter() - start) / 20, batch * vocab * 2,
                note="eager, host included")


GEMV_SWEEP = [
    dict(BLOCK_I=i, BLOCK_N=n, BLOCK_K=k, num_warps=w)
    # More rows per program share each thread's x loads over more weight rows, at the cost of registers.
    for i, n, k, w in ((8, 16, 512, 4), (4, 8, 512, 4), (8, 16, 256, 4), (16, 16, 512, 4), (16, 32, 512, 4),
                       (8, 16, 1024, 8), (16, 32, 1024, 8), (32, 32, 512, 4))
]
GROUPED_SWEEP = [  # our dequantise + tl.dot (every sweep entry runs through explicit(): unnamed flags off)
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
    for m, n, k, w, st in ((16, 64, 64, 4, 3), (16, 32, 128, 4, 3), (16, 64, 128, 4, 4), (64, 64, 128, 4, 3),
                           (64, 64, 256, 4, 3), (64, 32, 128, 4, 3), (128, 64, 128, 8, 3), (64, 64, 128, 8, 4))
] + [  # tl.dot_scaled on the packed bytes and scales (moe_grouped.py, DOT_SCALED)
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, DOT_SCALED=True)
    for m, n, k, w, st in ((16, 64, 64, 4, 3), (16, 64, 128, 4, 3), (16, 128, 128, 4, 3), (16, 64, 256, 4, 3),
                           (64, 64, 128, 4, 3), (64, 128, 128, 8, 3), (128, 128, 128, 8, 3), (64, 64, 256, 4, 3))
]


def sweep(layers: int) -> list[dict]:
    """Time the MoE kernels under other block tables (to choose the _common.py entries); failures are shown."""
    rows = []
    experts = moe_weights(layers)
    for tokens in (1, 8, 32, 64, 2048):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
        routes = [routing(tokens, seed) for seed in range(layers)]
        kernels = [("moe_gemv", moe_gemv, GEMV_SWEEP)] if tokens <= 8 else []
        kernels.append(("moe_grouped", moe_grouped, GROUPED_SWEEP if tokens > 1 else []))
        for name, fn, configs in kernels:
            for cfg in configs:
                if tokens == 2048 and cfg["BLOCK_M"] < 64:
                    continue
                run = explicit(cfg) if fn is moe_grouped else cfg
                calls = [lambda r=r, w=w, fn=fn, run=run: fn(x, *r, *w, config=run) for r, w in zip(routes, experts)]
                try:
                    us = time_per_call(calls, replays=5 if tokens == 2048 else 20) * 1e6
                except Exception as exc:  # a block shape can overflow shared memory on some parts
                    print(f"sweep {name} T={tokens} {cfg}: failed: {str(exc).splitlines()[0][:120]}", flush=True)
                    continue
                rows.append(dict(kernel=name, tokens=tokens, config=cfg, us=us))
                print(f"sweep {name} T={tokens} {cfg}: {us:.1f} us", flush=True)
    return rows


SMALL_SWEEP = [  # few pairs per expert: Triton's dot_scaled against our inline-PTX decode (FAST_FP4) on tl.dot
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, DOT_SCALED=not fast, FAST_FP4=fast)
    for m, n, k, w, st, fast in (
        (16, 64, 64, 4, 3, False), (16, 64, 128, 4, 3, False), (16, 64, 128, 4, 3, True), (16, 128, 64, 4, 3, True),
        (16, 128, 128, 4, 3, True), (16, 128, 128, 4, 2, True), (16, 128, 128, 4, 4, True), (16, 128, 256, 4, 3, True),
        (16, 256, 64, 4, 3, True), (16, 256, 128, 4, 3, True), (16, 256, 128, 8, 3, True), (16, 128, 128, 8, 3, True),
        (32, 128, 128, 4, 3, True),
    )
]
SMALL_MLP2 = [  # the sm90 table's small tile for mlp1, other tiles for mlp2 (K = intermediate, N = hidden)
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, FAST_FP4=True, ONE_DOT=True,
         MLP2=dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st))
    for n, k, w, st in ((256, 128, 4, 3), (256, 64, 4, 3), (128, 256, 4, 3), (64, 128, 4, 3), (64, 256, 4, 3),
                        (128, 128, 4, 4), (256, 128, 8, 3), (128, 64, 4, 3), (512, 64, 4, 3), (256, 32, 4, 3),
                        (256, 64, 4, 4), (256, 64, 4, 2), (512, 32, 8, 3))
]
SMALL_MLP1 = [  # mlp2 on the table's own tile, other tiles for mlp1 (gate and linear rows, K = hidden)
    dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, FAST_FP4=True, ONE_DOT=True,
         MLP2=dict(BLOCK_N=256, BLOCK_K=64))
    for n, k, w, st in ((128, 64, 4, 3), (64, 256, 4, 3), (128, 256, 4, 3), (256, 64, 4, 3), (64, 128, 4, 3),
                        (128, 128, 4, 4), (128, 128, 8, 4), (256, 128, 8, 3))
]
MID_SWEEP = [  # a prompt chunk beside a decode batch (~512 tokens: 64 pairs an expert)
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, DOT_SCALED=not fast, FAST_FP4=fast)
    for m, n, k, w, st, fast in (
        (32, 128, 128, 4, 3, True), (64, 128, 128, 4, 3, True), (64, 128, 64, 4, 3, True), (32, 64, 128, 4, 3, True),
        (64, 64, 128, 4, 3, True), (64, 128, 128, 8, 3, True), (16, 128, 128, 4, 3, True),
        (64, 128, 128, 4, 3, False), (64, 64, 128, 4, 3, False), (32, 128, 128, 4, 3, False),
    )
]
ONE_DOT_SWEEP = [  # mlp1's gate and linear rows as one block (ONE_DOT): half the accumulators, one dot a step
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, DOT_SCALED=not fast, FAST_FP4=fast, ONE_DOT=True)
    for m, n, k, w, st, fast in (
        (16, 64, 128, 4, 3, True), (16, 128, 128, 4, 3, True), (32, 64, 128, 4, 3, True), (64, 64, 128, 4, 3, True),
        (64, 64, 64, 4, 3, True), (64, 64, 128, 8, 3, True), (128, 64, 128, 8, 3, True), (64, 128, 64, 8, 3, True),
        (128, 64, 128, 8, 3, False), (64, 64, 128, 4, 3, False), (128, 128, 64, 8, 3, False),
    )
]
PREFILL_FAST = [  # many pairs per expert: the table's dot_scaled against FAST_FP4 on plain tl.dot
    # (through explicit() since 2026-11-23: before, the big table's DOT_SCALED turned FAST_FP4 off in these runs)
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, FAST_FP4=True)
    for m, n, k, w, st in ((64, 64, 128, 4, 3), (64, 128, 128, 8, 3), (128, 128, 128, 8, 3), (128, 128, 64, 8, 4),
                           (128, 64, 128, 8, 3), (128, 256, 64, 8, 3))
]


W_FIRST_SWEEP = [  # FAST_FP4 with the weights as the dot's first operand (wgmma's register one on sm90)
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, FAST_FP4=True, W_FIRST=True,
         MLP2=dict(BLOCK_N=n2, num_warps=w2))
    for m, n, k, w, st, n2, w2 in (  # all run on an H200, 2026-11-23 (BENCHMARKS.md, run 31)
        (16, 32, 128, 4, 3, 64, 4), (16, 64, 128, 4, 3, 64, 4), (16, 64, 128, 4, 3, 128, 4), (16, 128, 128, 8, 3, 128, 4),
        (32, 64, 128, 4, 3, 128, 4), (32, 128, 128, 8, 3, 128, 4), (64, 64, 128, 4, 3, 128, 4), (64, 64, 64, 4, 4, 128, 4),
        (64, 64, 256, 4, 2, 128, 4), (64, 128, 64, 8, 3, 256, 8), (128, 64, 128, 4, 3, 128, 4), (128, 128, 128, 8, 3, 256, 8),
        (64, 64, 64, 8, 4, 128, 8), (64, 64, 32, 4, 5, 128, 4), (64, 32, 64, 4, 4, 64, 4), (128, 64, 64, 4, 4, 128, 4),
        (128, 64, 64, 8, 4, 128, 8),
        # around the 64 x 64 x 32 tiles that won at 256-1024 tokens (sm90's large table since run 31)
        (64, 128, 32, 4, 5, 128, 4), (64, 128, 32, 8, 5, 128, 8), (128, 64, 32, 4, 5, 128, 4), (128, 64, 32, 8, 5, 128, 8),
        (64, 64, 32, 4, 6, 128, 4), (64, 32, 32, 4, 6, 64, 4), (32, 64, 32, 4, 5, 128, 4), (64, 64, 32, 4, 5, 64, 4),
        (64, 64, 32, 4, 5, 256, 8),
    )
]


def explicit(cfg: dict | None) -> dict | None:
    """A sweep entry as it reads: the path flags it does not name are off, and mlp2 runs on its main tile unless it
    names MLP2. (moe_grouped merges a config over the table it picks by size, so an entry would otherwise inherit
    the table's DOT_SCALED, FAST_FP4, ONE_DOT or MLP2 and run another path than its label says.)"""
    if cfg is None:
        return None
    return dict(DOT_SCALED=False, FAST_FP4=False, ONE_DOT=False, W_FIRST=False, MLP2={}, WGMMA=False) | cfg


def _sweep_moe(label: str, layers: int, token_counts: tuple[int, ...], runs_for) -> list[dict]:
    """Time each (name, fn, config) of runs_for(tokens) at each token count, as % of copy and TFLOP/s."""
    rows = []
    bandwidth = copy_bandwidth()
    experts = moe_weights(layers)
    for tokens in token_counts:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
        routes = [routing(tokens, seed) for seed in range(layers)]
        nbytes = sum(int(ids.unique().numel()) for ids, _ in routes) / layers * mxfp4_expert_bytes()
        flops = 2 * tokens * TOPK * (HIDDEN * 2 * INTER + INTER * HIDDEN)
        for name, fn, cfg in runs_for(tokens):
            run = explicit(cfg) if fn is moe_grouped else cfg
            calls = [lambda r=r, w=w, fn=fn, run=run: fn(x, *r, *w, config=run) for r, w in zip(routes, experts)]
            try:
                us = time_per_call(calls, replays=5 if tokens > 128 else 20) * 1e6
            except Exception as exc:  # a block shape can overflow shared memory or registers
                print(f"{label} {name} T={tokens} {cfg}: failed: {(str(exc) or repr(exc)).splitlines()[0][:120]}",
                      flush=True)
                continue
            pct = 100 * nbytes / (us / 1e6) / bandwidth
            rows.append(dict(kernel=name, tokens=tokens, config=cfg or "table", us=us, pct_copy=pct,
                             tflops=flops / us / 1e6))
            print(f"{label} {name} T={tokens} {cfg or '(table)'}: {us:.1f} us  {pct:.0f}% of copy  "
                  f"{flops / us / 1e6:.0f} TFLOP/s", flush=True)
    return rows


def sweep_w_first(layers: int, token_counts: tuple[int, ...] = (16, 64, 128, 256, 512, 1024, 2048)) -> list[dict]:
    """The grouped MoE over W_FIRST_SWEEP beside the table's choice (what moe() would run) at each token count."""
    def runs_for(tokens):
        return [("moe_grouped", moe_grouped, cfg) for cfg in [None] + W_FIRST_SWEEP
                if not cfg or not (tokens >= 1024 and cfg["BLOCK_M"] < 64 or tokens <= 64 and cfg["BLOCK_M"] > 64)]
    return _sweep_moe("w_first", layers, token_counts, runs_for)


def sweep_small(layers: int, token_counts: tuple[int, ...] = (8, 16, 32, 64, 128, 512, 2048)) -> list[dict]:
    """The grouped MoE over SMALL_SWEEP, SMALL_MLP2 and SMALL_MLP1 (up to 128 tokens), MID_SWEEP (up to 1024)
    or PREFILL_FAST, and ONE_DOT_SWEEP, beside the table's choice and, for few tokens, the GEMV's."""
    def runs_for(tokens):
        configs = SMALL_SWEEP + SMALL_MLP2 + SMALL_MLP1 if tokens <= 128 else MID_SWEEP if tokens <= 1024 else PREFILL_FAST
        configs = configs + [c for c in ONE_DOT_SWEEP if (c["BLOCK_M"] == 16) == (tokens <= 128)]
        runs = [("moe_grouped", moe_grouped, cfg) for cfg in [None] + configs]
        if tokens * TOPK <= 64:
            runs.insert(0, ("moe_gemv", moe_gemv, None))
        return runs
    return _sweep_moe("sweep", layers, token_counts, runs_for)


# sm90's Gluon MoE (moe_wgmma.py): (BLOCK_M, BLOCK_N, STAGES, SUB, warps, PROBE); moe_wgmma's is 16, 64, 2, 5, 4.
# PROBE reads each tile's bytes as one contiguous run (wrong numbers): what the weights' scattered rows cost.
WGMMA_SWEEP = [
    dict(BLOCK_M=m, BLOCK_N=n, STAGES=st, SUB=sub, num_warps=w, PROBE=bool(probe))
    for m, n, st, sub, w, probe in (
        (16, 64, 2, 5, 4, 0), (16, 64, 2, 5, 4, 1), (16, 64, 3, 3, 4, 0), (16, 64, 2, 3, 4, 0), (16, 64, 2, 9, 4, 0),
        (16, 64, 4, 1, 4, 0), (16, 64, 5, 1, 4, 0), (16, 128, 3, 3, 4, 0), (8, 64, 3, 3, 4, 0),
        (32, 64, 3, 3, 4, 0), (64, 64, 3, 3, 4, 0), (64, 64, 3, 3, 4, 1), (64, 128, 3, 3, 4, 0),
        # for prompt chunks beside decodes (the moe_wgmma_mid entry is 64, 128, 4, 1, 4)
        (64, 128, 4, 1, 4, 0), (64, 128, 3, 1, 4, 0), (32, 128, 3, 1, 4, 0), (128, 64, 3, 1, 4, 0),
    )
]


def triton_tiles(*args, config: dict | None = None):
    """moe_grouped on its own Triton tiles (the table's choice of them), never handing over to moe_wgmma."""
    return moe_grouped(*args, config=dict(config or {}, WGMMA=False))


def sweep_wgmma(layers: int, token_counts: tuple[int, ...] = (8, 16, 64, 128, 144, 256, 512, 1024)) -> list[dict]:
    """sm90's Gluon MoE over WGMMA_SWEEP beside what moe() runs (the table) and the Triton tiles it replaced."""
    def runs_for(tokens):
        runs = [("moe_grouped", moe_grouped, None), ("triton tiles", triton_tiles, None)]
        for cfg in WGMMA_SWEEP:
            m = cfg["BLOCK_M"]
            if m < 16 and tokens > 16 or m > 16 and tokens < 64 or m < 64 and tokens > 512:
                continue
            runs.append(("moe_wgmma", moe_wgmma, cfg))
        return runs
    return _sweep_moe("wgmma", layers, token_counts, runs_for)


def sweep_rope(layers: int, token_counts: tuple[int, ...] = (1, 8, 16, 64, 512, 2048)) -> list[dict]:
    """rope_and_cache with 1-32 heads of one token a program: where a block of heads pays (rope.HEADS_FROM)."""
    rows = []
    qkv_width = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    caches = [torch.zeros(4096, KV_HEADS, HEAD_DIM, device="cuda", dtype=BF16) for _ in range(2)]
    for tokens in token_counts:
        qkvs = [torch.randn(tokens, qkv_width, device="cuda", dtype=BF16) for _ in range(layers)]
        positions = torch.arange(tokens, device="cuda")
        cos = torch.randn(tokens, HEAD_DIM // 2, device="cuda")
        sin = torch.randn_like(cos)
        for heads in (None, 1, 2, 4, 8, 16, 32):
            calls = [lambda x=x, h=heads: rope_and_cache(x, cos, sin, positions, *caches, Q_HEADS, KV_HEADS,
                                                         heads_per_program=h) for x in qkvs]
            us = time_per_call(calls) * 1e6
            name = "as run" if heads is None else f"{heads} heads a program"
            rows.append(dict(kernel="rope_and_cache", tokens=tokens, config=name, us=us))
            print(f"rope_and_cache T={tokens} {name}: {us:.1f} us", flush=True)
    return rows


def sweep_router(layers: int, token_counts: tuple[int, ...] = (1, 8, 16, 64, 128, 512)) -> list[dict]:
    """norm_router as the model calls it (float32 stream + bf16 out-projection, norm, bf16-rounded logits; the
    MoE GEMV's input layout up to 8 tokens) at 1-64 programs a row, beside its default."""
    from kubrick.engine.kernels import uses_gemv
    from kubrick.engine.kernels.moe_gemv import new_gemv_input
    from kubrick.engine.kernels.router import norm_router

    rows = []
    gates = [(torch.randn(EXPERTS, HIDDEN, device="cuda", dtype=BF16) / 50,
              torch.randn(EXPERTS, device="cuda", dtype=BF16)) for _ in range(layers)]
    norm_w = torch.rand(HIDDEN, device="cuda") + 0.5
    for tokens in token_counts:
        xs = [torch.randn(tokens, HIDDEN, device="cuda") for _ in range(layers)]
        ys = [torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16) for _ in range(layers)]
        streams = [torch.empty_like(x) for x in xs]
        gemv = new_gemv_input(tokens, HIDDEN, BF16, torch.device("cuda")) if uses_gemv(tokens, TOPK, xs[0].device) \
            else None
        for splits in (None, 1, 2, 4, 8, 16, 32, 64):
            calls = [lambda x=x, y=y, g=g, s=s: norm_router(x, y, norm_w, 1e-5, *g, TOPK, stream=s, gemv_out=gemv,
                                                            round_logits=True, splits=splits)
                     for x, y, g, s in zip(xs, ys, gates, streams)]
            try:
                us = time_per_call(calls) * 1e6
            except Exception as exc:  # a split too thin for a K step
                print(f"norm_router T={tokens} splits {splits}: failed: {str(exc).splitlines()[0][:100]}", flush=True)
                continue
            name = "default" if splits is None else f"{splits} a row"
            rows.append(dict(kernel="norm_router", tokens=tokens, config=name, us=us))
            print(f"norm_router T={tokens} {name}: {us:.1f} us", flush=True)
    return rows


def sweep_top_p(vocab: int = 201_088, row_counts: tuple[int, ...] = (1, 8, 64)) -> list[dict]:
    """nucleus.top_p_cut over its block sizes and warps, on bf16 and float32 logits (the scheduler's are float32),
    against the sort it replaced (sampler.cuts): temperature 1, top_p 0.9."""
    from kubrick.engine.kernels.nucleus import top_p_cut
    from kubrick.engine.sampler import cuts

    rows = []
    for dtype in (BF16, torch.float32):
        for count in row_counts:
            logits = torch.randn(count, vocab, device="cuda").to(dtype)
            t, top_p = torch.ones(count, device="cuda"), torch.full((count,), 0.9, device="cuda")
            every = torch.full((count,), float(vocab), device="cuda")
            configs = [("sort (cuts)", lambda: cuts(logits, t, every, top_p))] + [
                (f"BLOCK {b}, {w} warps", lambda b=b, w=w: top_p_cut(logits, t, top_p, block=b, num_warps=w))
                for b in (128, 256, 512) for w in (2, 4, 8)]
            for name, call in configs:
                us = time_per_call([call] * 4) * 1e6
                rows.append(dict(kernel="top_p_cut", rows=count, dtype=str(dtype), config=name, us=us))
                print(f"top_p_cut {str(dtype)[6:]} rows={count} {name}: {us:.1f} us", flush=True)
    return rows


def sweep_grouping(layers: int, token_counts: tuple[int, ...] = (64, 256, 300, 512, 1024, 2048)) -> list[dict]:
    """group_by_expert as moe_grouped runs it (one program up to SPLIT_PAIRS pairs, a program per chunk above)
    against one program at every size: where the split pays."""
    rows = []
    for tokens in token_counts:
        routes = [routing(tokens, seed)[0] for seed in range(layers)]
        for name, limit in (("as run", grouped_module.SPLIT_PAIRS), ("one program", 1 << 30)):
            calls = [lambda ids=ids, limit=limit: group_by_expert(ids, EXPERTS, 16, split_pairs=limit)
                     for ids in routes]
            us = time_per_call(calls) * 1e6
            rows.append(dict(kernel="group_by_expert", tokens=tokens, config=name, us=us))
            print(f"grouping T={tokens} ({tokens * TOPK} pairs) {name}: {us:.1f} us", flush=True)
    return rows


def sweep_tables(layers: int, token_counts: tuple[int, ...] = (128, 144, 160, 176, 192, 224, 256, 512)) -> list[dict]:
    """The grouped MoE's block tables (moe_grouped_small, moe_grouped, and sm90's moe_wgmma) at each token count,
    each whole: where one should hand over to the next, and how a mixed step's MoE grows with its rows."""
    rows = []
    experts = moe_weights(layers)
    # Each table whole: a config overrides only the keys it names, on top of the table moe() picks by size.
    keys = dict(DOT_SCALED=False, FAST_FP4=False, ONE_DOT=False, W_FIRST=False, MLP2={}, WGMMA=False)
    tables = {name: (moe_grouped, keys | block_config(name, torch.device("cuda")))
              for name in ("moe_grouped_small", "moe_grouped")}
    for name in ("moe_wgmma", "moe_wgmma_mid"):
        tables[name] = (moe_wgmma, block_config(name, torch.device("cuda")))
    for tokens in token_counts:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
        routes = [routing(tokens, seed) for seed in range(layers)]
        for name, (fn, cfg) in tables.items():
            calls = [lambda r=r, w=w, fn=fn, cfg=cfg: fn(x, *r, *w, config=cfg) for r, w in zip(routes, experts)]
            us = time_per_call(calls, replays=5) * 1e6
            rows.append(dict(kernel="moe_grouped", tokens=tokens, config=name, us=us))
            print(f"tables T={tokens} ({tokens * TOPK / EXPERTS:.0f} pairs an expert) {name}: {us:.1f} us", flush=True)
    return rows


def sweep_gemv_splits(layers: int) -> list[dict]:
    """moe_gemv at 1 and 8 tokens over BLOCK_I (mlp1 rows), BLOCK_N/BLOCK_K (mlp2 rows, values a step) and mlp2's
    split_k; then the table's GEMV against the grouped kernel at 8-16 tokens (where the table's MAX_PAIRS belongs)."""
    rows = []
    experts = moe_weights(layers)
    for tokens in (1, 8):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
        routes = [routing(tokens, seed) for seed in range(layers)]
        for block_i in (4, 8, 16):
            for block_n, block_k in ((8, 512), (16, 512), (16, 1024), (32, 512)):
                for split_k in (1, 2, 4, 8):
                    cfg = dict(BLOCK_I=block_i, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
                    calls = [lambda r=r, w=w, cfg=cfg, s=split_k: moe_gemv(x, *r, *w, split_k=s, config=cfg)
                             for r, w in zip(routes, experts)]
                    us = time_per_call(calls) * 1e6
                    rows.append(dict(kernel="moe_gemv", tokens=tokens, config=cfg | {"split_k": split_k}, us=us))
                    print(f"sweep moe_gemv T={tokens} I={block_i} N={block_n} K={block_k} split={split_k}: {us:.1f} us",
                          flush=True)
    return rows + gemv_against_grouped(experts, layers, (8, 12, 16), "sweep")


def gemv_against_grouped(experts, layers: int, token_counts: tuple[int, ...], label: str) -> list[dict]:
    """The table's moe_gemv against moe_grouped at each token count: where moe()'s MAX_PAIRS belongs."""
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
        routes = [routing(tokens, seed) for seed in range(layers)]
        for name, fn in (("moe_gemv", moe_gemv), ("moe_grouped", moe_grouped)):
            us = time_per_call([lambda r=r, w=w, fn=fn: fn(x, *r, *w) for r, w in zip(routes, experts)]) * 1e6
            rows.append(dict(kernel=name, tokens=tokens, config={}, us=us))
            print(f"{label} {name} T={tokens} (the table): {us:.1f} us", flush=True)
    return rows


LINEAR_SWEEP = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w)
                for n, k, w in ((8, 512, 4), (4, 512, 4), (16, 256, 4), (8, 1024, 8), (16, 512, 8), (32, 256, 4),
                                (4, 1024, 4), (2, 1024, 4))]


def sweep_linear(layers: int) -> list[dict]:
    """kernels.linear's one-token GEMV over block sizes against F.linear (cuBLAS), at the out-projection and QKV
    shapes, bias and a residual added in the kernel (as the model's out-projection did before norm_router took the
    residual add)."""
    import torch.nn.functional as F

    from kubrick.engine.kernels.linear import linear

    rows = []
    for n, k in ((HIDDEN, Q_HEADS * HEAD_DIM), ((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)):
        ws = [torch.randn(n, k, device="cuda", dtype=BF16) / k**0.5 for _ in range(layers)]
        b = torch.randn(n, device="cuda", dtype=BF16)
        x = torch.randn(1, k, device="cuda", dtype=BF16)
        r = torch.randn(1, n, device="cuda", dtype=BF16)
        nbytes = n * k * 2
        us = time_per_call([lambda w=w: r + F.linear(x, w, b) for w in ws]) * 1e6
        rows.append(dict(kernel="F.linear + residual", shape=[n, k], us=us))
        print(f"sweep linear {n}x{k} cuBLAS + add: {us:.1f} us  ({nbytes / us / 1e3:.0f} GB/s)", flush=True)
        for cfg in LINEAR_SWEEP:
            us = time_per_call([lambda w=w, cfg=cfg: linear(x, w, b, residual=r, config=cfg) for w in ws]) * 1e6
            rows.append(dict(kernel="linear_gemv", shape=[n, k], config=cfg, us=us))
            print(f"sweep linear {n}x{k} gemv {cfg}: {us:.1f} us  ({nbytes / us / 1e3:.0f} GB/s)", flush=True)
    return rows


DECODE_GEMV_SWEEP = [  # {} is the table; HALF=False the float32 layout; the rest half-layout block shapes
    {}, dict(HALF=False), dict(HALF=False, BLOCK_I=4, BLOCK_K=512, num_warps=4, MLP2=dict(BLOCK_N=16)),
    dict(BLOCK_I=4, BLOCK_K=512, num_warps=4, MLP2=dict(BLOCK_N=16)),
    dict(BLOCK_I=4, BLOCK_K=1024, num_warps=8), dict(MLP2=dict(BLOCK_N=16)),
    dict(MLP2=dict(BLOCK_N=32, BLOCK_K=1024, num_warps=8)),
]


def sweep_decode_gemvs(layers: int) -> list[dict]:
    """The one-token GEMVs: moe_gemv at 1 and 8 tokens over DECODE_GEMV_SWEEP, the table's moe_gemv against
    moe_grouped at 8-24 tokens, and kernels.linear against cuBLAS at the out-projection, QKV and unembedding
    shapes."""
    import torch.nn.functional as F

    from kubrick.engine.kernels.linear import linear

    rows = []
    experts = moe_weights(layers)
    moe_bytes = mxfp4_expert_bytes() * TOPK
    for tokens in (1, 8):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
        routes = [routing(tokens, seed) for seed in range(layers)]
        for cfg in DECODE_GEMV_SWEEP:
            calls = [lambda r=r, w=w, cfg=cfg: moe_gemv(x, *r, *w, config=cfg) for r, w in zip(routes, experts)]
            us = time_per_call(calls) * 1e6
            rows.append(dict(kernel="moe_gemv", tokens=tokens, config=cfg, us=us))
            note = f"  ({moe_bytes / us / 1e3:.0f} GB/s)" if tokens == 1 else ""
            print(f"sweep-decode moe_gemv T={tokens} {cfg or 'the table'}: {us:.1f} us{note}", flush=True)
    rows += gemv_against_grouped(experts, layers, (8, 12, 14, 16, 24), "sweep-decode")
    del experts
    torch.cuda.empty_cache()
    shapes = ((HIDDEN, Q_HEADS * HEAD_DIM, layers), ((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, layers),
              (VOCAB, HIDDEN, 2))
    for n, k, copies in shapes:
        ws = [torch.randn(n, k, device="cuda", dtype=BF16) / k**0.5 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=BF16)
        nbytes = n * k * 2
        us = time_per_call([lambda w=w: F.linear(x, w) for w in ws]) * 1e6
        rows.append(dict(kernel="F.linear", shape=[n, k], us=us))
        print(f"sweep-decode linear {n}x{k} cuBLAS: {us:.1f} us  ({nbytes / us / 1e3:.0f} GB/s)", flush=True)
        for block_n, block_k in ((2, 1024), (2, 512), (4, 512)):
            cfg = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
            us = time_per_call([lambda w=w, cfg=cfg: linear(x, w, config=cfg) for w in ws]) * 1e6
            rows.append(dict(kernel="linear_gemv", shape=[n, k], config=cfg, us=us))
            print(f"sweep-decode linear {n}x{k} gemv {cfg}: {us:.1f} us  ({nbytes / us / 1e3:.0f} GB/s)", flush=True)
        del ws
        torch.cuda.empty_cache()
    return rows


def random_20b_weights() -> tuple:
    """gpt-oss-20b's config and random weights made on the GPU (no checkpoint on disk), names as the loader's."""
    import math

    from kubrick.engine.checkpoint import UINT8, original_tensors
    from kubrick.engine.config import ModelConfig

    config = ModelConfig()
    weights = {}
    for name, (shape, kind) in original_tensors(config).items():
        if kind == UINT8 and name.endswith(".blocks"):
            weights[name] = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
        elif kind == UINT8:  # scales: block RMS about 1/sqrt(fan_in)
            weights[name] = torch.randint(118, 121, shape, dtype=torch.uint8, device="cuda")
        elif name.endswith(".scale") or name.endswith(".sinks"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, device="cuda")
        else:
            std = 0.1 if name.endswith(".bias") else (1.0 if name == "embedding.weight" else 1 / math.sqrt(shape[-1]))
            weights[name] = (torch.randn(shape, device="cuda") * std).to(BF16)
    return config, weights


def random_20b_model() -> tuple:
    """(config, FastTransformer) on random_20b_weights. The weights' dict is dropped here: the model keeps the
    QKV projections in its own row order, so a caller holding the dict would hold them twice (~0.7 GB)."""
    from kubrick.engine.fast_model import FastTransformer

    config, weights = random_20b_weights()
    return config, FastTransformer(config, weights)


def bench_model() -> list[dict]:
    """FastTransformer at the 20b shape: decode ms/token (eager and CUDA graph) and prefill tokens/s."""
    from kubrick.engine.fast_model import CudaGraphDecoder

    config, model = random_20b_model()
    rows = []
    for context in (128, 4096):
        cache = model.new_cache(context + 128)  # prompt, 4 warm-up, 32 eager and 32 graphed steps
        prompt = torch.randint(0, config.vocab_size, (context,), device="cuda")
        for chunk in torch.split(prompt, 2048):
            logits = model(chunk, cache)
        token = logits[-1].argmax().view(1)
        for _ in range(4):  # warm up
            token = model(token, cache)[-1].argmax().view(1)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        steps = 32
        for _ in range(steps):
            token = model(token, cache)[-1].argmax().view(1)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / steps
        rows.append(dict(kernel=f"FastTransformer decode ctx={context} (eager)", us=ms * 1e3, note=f"{1e3 / ms:.0f} tok/s"))
        print(format_row(rows[-1]), flush=True)
        decoder = CudaGraphDecoder(model, cache)
        start.record()
        for _ in range(steps):
            token = decoder.step(token)[-1].argmax().view(1)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / steps
        rows.append(dict(kernel=f"FastTransformer decode ctx={context} (CUDA graph)", us=ms * 1e3,
                         note=f"{1e3 / ms:.0f} tok/s"))
        print(format_row(rows[-1]), flush=True)
        del decoder
    cache = model.new_cache(2048)
    prompt = torch.randint(0, config.vocab_size, (2048,), device="cuda")
    model(prompt, cache)
    cache.truncate(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    model(prompt, cache)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    rows.append(dict(kernel="FastTransformer prefill 2048 tokens", us=ms * 1e3, note=f"{2048e3 / ms:.0f} tok/s"))
    print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    parts = [f"{row['kernel']:<36} {row['us']:9.1f} us"]
    if "gbps" in row:
        parts.append(f"{row['bytes'] / 1e6:9.2f} MB {row['gbps']:8.1f} GB/s {row['pct_copy']:6.1f}% of copy")
    if "tflops" in row:
        parts.append(f"{row['tflops']:8.1f} TFLOP/s")
    if row["note"]:
        parts.append(f"({row['note']})")
    return "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench_kernels.json"), help="where to write the results")
    parser.add_argument("--layers", type=int, default=8, help="distinct weight/cache copies per timed graph")
    parser.add_argument("--sweep", action="store_true", help="also time the MoE kernels under other block sizes")
    parser.add_argument("--sweep-gemv", action="store_true", help="also time moe_gemv over its blocks and split-K")
    parser.add_argument("--sweep-small", action="store_true", help="also time the grouped MoE at 8-2048 tokens: dot_scaled against FAST_FP4")
    parser.add_argument("--sweep-linear", action="store_true", help="also time the one-token linear GEMV vs cuBLAS")
    parser.add_argument("--sweep-decode", action="store_true",
                        help="also time moe_gemv over block shapes and the one-token linear against cuBLAS")
    parser.add_argument("--sweep-tables", action="store_true",
                        help="also time the grouped MoE's two block tables at 128-512 tokens (where one hands over)")
    parser.add_argument("--sweep-w-first", action="store_true",
                        help="also time the grouped MoE with the weights as the dot's first operand (W_FIRST)")
    parser.add_argument("--sweep-wgmma", action="store_true",
                        help="also time sm90's Gluon MoE (moe_wgmma) over its blocks beside the Triton tiles")
    parser.add_argument("--sweep-grouping", action="store_true",
                        help="also time the MoE's grouping of pairs by expert, split over programs or not")
    parser.add_argument("--sweep-rope", action="store_true",
                        help="also time RoPE + KV write with 1-32 heads of a token a program")
    parser.add_argument("--sweep-router", action="store_true",
                        help="norm_router at 1-64 programs a row, 1-512 tokens (its split heuristic)")
    parser.add_argument("--sweep-top-p", action="store_true",
                        help="also time the top-p cut (nucleus.py) over its blocks and warps against the sort")
    parser.add_argument("--sweeps-only", action="store_true", help="skip the kernel figures, run only the sweeps asked")
    parser.add_argument("--model", action="store_true", help="also time FastTransformer at the 20b shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  capability {torch.cuda.get_device_capability()}  "
          f"torch {torch.__version__}", flush=True)
    rows, bandwidth = ([], copy_bandwidth()) if args.sweeps_only else bench(args.layers)
    print(f"device-to-device copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    sweep_rows = sweep(args.layers) if args.sweep else []
    if args.sweep_gemv:
        sweep_rows += sweep_gemv_splits(args.layers)
    if args.sweep_small:
        sweep_rows += sweep_small(args.layers)
    if args.sweep_linear:
        sweep_rows += sweep_linear(args.layers)
    if args.sweep_decode:
        sweep_rows += sweep_decode_gemvs(args.layers)
    if args.sweep_tables:
        sweep_rows += sweep_tables(args.layers)
    if args.sweep_w_first:
        sweep_rows += sweep_w_first(args.layers)
    if args.sweep_wgmma:
        sweep_rows += sweep_wgmma(args.layers)
    if args.sweep_grouping:
        sweep_rows += sweep_grouping(args.layers)
    if args.sweep_rope:
        sweep_rows += sweep_rope(args.layers)
    if args.sweep_router:
        sweep_rows += sweep_router(8)
    if args.sweep_top_p:
        sweep_rows += sweep_top_p()
    if args.model:
        torch.cuda.empty_cache()
        try:
            rows += bench_model()
        except Exception as exc:  # keep the kernel figures even if the model run fails
            print(f"FastTransformer bench failed: {exc!r}", flush=True)
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
        torch=torch.__version__, host=platform.node(), copy_gbps=bandwidth / 1e9, rows=rows, sweep=sweep_rows,
    )
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
