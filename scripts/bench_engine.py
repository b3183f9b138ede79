#!/usr/bin/env python
"""Measure a gpt-oss engine model: prefill and decode tokens/s, and the memory its weights take.

Random weights of the preset's exact shape (experts packed as MXFP4, as loaded from a checkpoint):

    python scripts/bench_engine.py                                  # tiny, reference model, on CPU
    python scripts/bench_engine.py --preset 20b --device cuda       # writes a random 20b checkpoint to a temp dir
    python scripts/bench_engine.py --preset 20b --device cuda --checkpoint /data/ck20b   # reuse or create it there
    python scripts/bench_engine.py --preset 20b --device cuda --impl reference           # the oracle instead

--impl triton (the default on CUDA, as in the Engine) runs the kernel engine (GraphedFastTransformer with its
CUDA-graph decode) and reports: batch-1 decode at contexts 128 and 4096, prefill of 2048 tokens (one chunk and
the engine's 512-token chunks), decode at batch 8, 32 and 64 (static batched KV cache, one CUDA graph per
batch bucket), continuous batching's decode step at batch 1, 8, 32 and 64 (paged KV cache, forward_batch with
its host work, as the scheduler runs it; and one step where a prompt chunk joins), weights memory, each as a percentage of its roofline (bytes per token from FACTS.md over the
device-to-device copy bandwidth measured in the same run; prefill: FLOPs over a cuBLAS bf16 GEMM measured in
the same run), and a torch.profiler breakdown of one decode step (batch 1 and 64) and the prefill by kernel.
--impl reference measures batch-1 prefill and decode of the reference model (plain PyTorch).

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


# gpt-oss-20b bytes read per decoded token at batch 1 (../shared/FACTS.md): attention weights, one MXFP4 expert
# of one layer, the bf16 unembedding, the routers; K and V of one cached token in one layer.
ATTENTION_BYTES, EXPERT_LAYER_BYTES, UNEMBEDDING_BYTES, ROUTER_BYTES = 1.274e9, 1.271e9 / 96, 1.158e9, 4e6
KV_TOKEN_LAYER_BYTES = 2048
WEIGHTS_TARGET_BYTES = 14e9


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 20 copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = _events()
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times[2:])[len(times[2:]) // 2]


def gemm_flops(n: int = 8192) -> float:
    """bf16 FLOP/s of one cuBLAS n x n x n matmul (median of 10): the compute roofline prefill is held to."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(12):
        start, end = _events()
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times[2:])[len(times[2:]) // 2]


def kv_bytes_per_sequence(config, context: int) -> float:
    layers = config.num_hidden_layers
    sliding = sum(config.is_sliding(i) for i in range(layers))
    window = min(context, config.sliding_window)
    return KV_TOKEN_LAYER_BYTES * ((layers - sliding) * context + sliding * window)


def decode_step_bytes(config, batch: int, context: int) -> float:
    """Bytes one decode step must read: every dense weight once, each expert some token picked once (expected
    number of distinct experts for batch x top-k uniform picks), each sequence's visible keys and values."""
    experts, k = config.num_experts, config.experts_per_token
    distinct = experts * (1 - (1 - k / experts) ** batch)
    return (ATTENTION_BYTES + UNEMBEDDING_BYTES + ROUTER_BYTES + distinct * config.num_hidden_layers * EXPERT_LAYER_BYTES
            + batch * kv_bytes_per_sequence(config, context))


def prefill_flops_per_token(config, prompt: int) -> float:
    """Multiply-adds x 2 per prompt token: projections, k of the experts, the router, and attention over the
    keys each query sees (causal: (prompt+1)/2 on average, at most the window on sliding layers)."""
    c = config
    h, d = c.hidden_size, c.head_dim
    qkv = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    out = c.num_attention_heads * d * h
    experts = c.experts_per_token * (h * 2 * c.intermediate_size + c.intermediate_size * h)
    router = h * c.num_experts
    total = 0.0
    for layer in range(c.num_hidden_layers):
        seen = min((prompt + 1) / 2, c.sliding_window) if c.is_sliding(layer) else (prompt + 1) / 2
        total += 2 * (qkv + out + experts + router) + 4 * c.num_attention_heads * d * seen
    return total


def _timed(fn, repeats: int) -> float:
    """Seconds per call of fn() (which queues GPU work), timed with CUDA events after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = _events()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def decode_batch1(model, config, context: int, steps: int) -> dict:
    """Greedy decode after a `context`-token prompt, through the Engine's path (one-token forward = graph replay)."""
    cache = model.new_cache(context + 2 * steps + 64)  # warm-up + timed + host-sampler steps; captures the graph
    prompt = torch.randint(0, config.vocab_size - 1000, (context,), device="cuda")
    for chunk in torch.split(prompt, 2048):
        logits = model(chunk, cache)
    state = {"token": logits[-1].argmax().view(1)}

    def step():
        state["token"] = model(state["token"], cache)[-1].argmax().view(1)

    for _ in range(3):
        step()
    seconds = _timed(step, steps)
    # As Engine.generate does it: the logits go to the host sampler every token (one sync per token).
    from kubrick.engine.api import SamplingParams
    from kubrick.engine.sampler import Sampler

    sampler = Sampler(SamplingParams(temperature=0))
    token = int(state["token"])
    start = time.perf_counter()
    for _ in range(steps // 2):
        token = sampler(model(torch.tensor([token], device="cuda"), cache)[-1])
    host_seconds = (time.perf_counter() - start) / (steps // 2)
    return {"context": context, "steps": steps, "s_per_token": seconds, "tok_s": 1 / seconds,
            "host_sampler_tok_s": 1 / host_seconds}


def prefill(model, config, prompt_tokens: int, chunk: int) -> float:
    cache = model.new_cache(prompt_tokens + 1)  # GraphedFastTransformer captures a (small) decode graph here too
    prompt = torch.randint(0, config.vocab_size - 1000, (prompt_tokens,), device="cuda")

    def run():
        cache.truncate(0)
        for part in torch.split(prompt, chunk):
            model(part, cache)

    return _timed(run, 3)


def batched_decoder(model, batches, context: int, steps: int):
    """A CudaGraphBatchDecoder (one graph per bucket of `batches`) over a static batched cache whose sequences hold
    `context` cached tokens (random keys/values: attention's cost does not depend on them), room for `steps` more."""
    from kubrick.engine.fast_model import CudaGraphBatchDecoder

    cache = model.new_batched_cache(max(batches), context + steps + 8)
    for t in cache.keys + cache.values:
        t.normal_()
    return CudaGraphBatchDecoder(model, cache, buckets=batches)


def greedy_batch_step(decoder, config, batch: int, context: int):
    """A function that runs one greedy decode step of `batch` sequences from position `context` on."""
    state = {"tokens": torch.randint(0, config.vocab_size - 1000, (batch,), device="cuda"),
             "positions": torch.full((batch,), context, dtype=torch.long, device="cuda")}

    def step():
        logits = decoder.step(state["tokens"], state["positions"])
        state["tokens"] = logits[:batch].argmax(dim=-1)
        state["positions"] = state["positions"] + 1

    return step


def decode_batched(model, config, batches, context: int, steps: int) -> list[dict]:
    """Decode at each batch size through CudaGraphBatchDecoder (one graph per bucket, static batched cache)."""
    decoder = batched_decoder(model, batches, context, steps)
    rows = []
    for batch in batches:
        seconds = _timed(greedy_batch_step(decoder, config, batch, context), steps)
        rows.append({"batch": batch, "context": context, "s_per_step": seconds, "tok_s": batch / seconds})
    return rows


def decode_paged(model, config, batches, context: int, steps: int) -> list[dict]:
    """Continuous batching's decode step, as the scheduler runs it: FastTransformer.forward_batch over the paged
    KV cache (graph replay per bucket) with its host work (block tables, transfers) and one greedy argmax per
    batch, wall clock per step. Each sequence's `context`-token prompt is prefilled first (all in one step).
    Also: one mixed step (the batch decoding while a new 448-token prompt chunk joins), one CUDA graph as the
    Engine runs it, and eager."""
    top, page, step_tokens = max(batches), 16, 512
    prompt_step = max(step_tokens, context)  # each sequence's prompt is read in one step below
    per_seq = -(-(context + 4 * steps + 64) // page)
    span = -(-(config.sliding_window + prompt_step) // page) + 1
    cache = model.new_paged_cache(num_blocks=(top + 1) * per_seq + 64, window_blocks=(top + 1) * span + 16,
                                  block_size=page)
    cache.prefix_reuse = False  # the mixed step re-sends one prompt: it must be computed every time
    model.capture_paged(cache, max_blocks=per_seq, max_batch=top, max_rows=step_tokens)
    # A 2048-token prompt read in steps of step_tokens through forward_batch, as the scheduler feeds a lone
    # request's prompt (graph pieces, each step's logits read back): the Engine's prefill.
    prompt = torch.randint(0, config.vocab_size - 1000, (2048,)).tolist()

    def prompt_in_steps():
        seq = cache.admit(prompt, 2049, step_tokens)
        for start in range(0, len(prompt), step_tokens):
            model.forward_batch([(seq, prompt[start : start + step_tokens])], cache)
        cache.release(seq)

    prefill_steps_s = min(_timed(prompt_in_steps, 1) for _ in range(3))
    rows = []
    for batch in batches:
        prompts = [torch.randint(0, config.vocab_size - 1000, (context,)).tolist() for _ in range(batch)]
        seqs = [cache.admit(p, context + 4 * steps, prompt_step) for p in prompts]
        logits = model.forward_batch(list(zip(seqs, prompts)), cache)
        tokens = logits.argmax(-1).tolist()

        def step():
            out = model.forward_batch([(s, [t]) for s, t in zip(seqs, tokens)], cache)
            tokens[:] = out.argmax(-1).tolist()  # the scheduler's one transfer per step

        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
        row = {"batch": batch, "context": context, "s_per_step": seconds, "tok_s": batch / seconds,
               "prefill_2048_in_steps_s": prefill_steps_s}
        if batch == top:  # a prompt chunk joins the full batch: the step every stream then waits for
            newcomer = torch.randint(0, config.vocab_size - 1000, (448,)).tolist()

            def mixed_step():
                seq = cache.admit(newcomer, 512, step_tokens)
                out = model.forward_batch([(s, [t]) for s, t in zip(seqs, tokens)] + [(seq, newcomer)], cache)
                tokens[:] = out[:batch].argmax(-1).tolist()
                cache.release(seq)

            row["mixed_step_s"] = min(_timed(mixed_step, 1) for _ in range(3))  # the mixed CUDA graph
            graphs, model.mixed_graphs = model.mixed_graphs, None
            row["mixed_step_eager_s"] = min(_timed(mixed_step, 1) for _ in range(3))
            # Its GPU kernels alone: what is left of the eager wall time is the host launching them one by one.
            row["mixed_profile"] = profile(mixed_step)
            model.mixed_graphs = graphs
        for seq in seqs:
            cache.release(seq)
        rows.append(row)
    model.paged_decoder = model.mixed_graphs = None
    return rows


def kernel_label(name: str) -> str:
    """Which part of the model a GPU kernel belongs to, from its name (Triton kernels carry their function's)."""
    table = [
        ("mlp1_swiglu_gemv", "MoE decode GEMV mlp1+swiglu (Triton)"), ("mlp2_combine_gemv", "MoE decode GEMV mlp2 (Triton)"),
        ("mlp1_swiglu_grouped", "MoE grouped mlp1+swiglu (Triton)"), ("mlp2_combine_grouped", "MoE grouped mlp2 (Triton)"),
        ("mlp1_wgmma", "MoE wgmma mlp1+swiglu (Gluon, sm90)"), ("mlp2_wgmma", "MoE wgmma mlp2 (Gluon, sm90)"),
        ("group_by_expert", "MoE pairs grouped by expert (Triton)"),
        ("decode_split", "attention decode (Triton)"), ("decode_combine", "attention decode combine (Triton)"),
        ("_prefill_kernel", "attention prefill (Triton)"), ("rmsnorm", "RMSNorm (Triton)"),
        ("rope_cache", "RoPE + KV write (Triton)"), ("_router_kernel", "residual add + RMSNorm + router (Triton)"),
        ("linear_gemv", "one-token linear GEMV: QKV, out-projection, unembedding (Triton)"),
    ]
    for key, label in table:
        if key in name:
            return label
    lowered = name.lower()
    if any(key in lowered for key in ("gemv", "gemm", "nvjet", "cutlass", "xmma", "splitk", "cublas")):
        return "cuBLAS matmul (QKV, out and unembedding beyond one token)"
    return "other torch kernels (embedding, add, cos/sin, argmax, sort, copies)"


def profile(fn, repeats: int = 3) -> dict:
    """GPU time of fn() by kernel and by linear shape, per call, from torch.profiler (fn run eagerly)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.time_range.elapsed_us() / repeats
    total = sum(kernels.values()) or 1.0
    by_label: dict[str, float] = {}
    for name, us in kernels.items():
        by_label[kernel_label(name)] = by_label.get(kernel_label(name), 0.0) + us
    linears = []
    for avg in prof.key_averages(group_by_input_shape=True):
        if avg.key == "aten::linear":
            us = getattr(avg, "device_time_total", None) or getattr(avg, "cuda_time_total", 0.0)
            linears.append({"shapes": str(avg.input_shapes[:2]), "calls": avg.count // repeats, "us": us / repeats,
                            "share": us / repeats / total})
    return {
        "gpu_us": total,
        "by_part": sorted(({"part": k, "us": v, "share": v / total} for k, v in by_label.items()), key=lambda r: -r["us"]),
        "by_kernel": sorted(({"kernel": k[:100], "label": kernel_label(k), "us": v, "share": v / total}
                             for k, v in kernels.items()), key=lambda r: -r["us"])[:15],
        "linear_by_shape": sorted(linears, key=lambda r: -r["us"]),
    }


def profiles(model, config, batch_context: int) -> dict:
    out = {}
    cache = model.new_cache(4200)
    prompt = torch.randint(0, config.vocab_size - 1000, (4096,), device="cuda")
    for chunk in torch.split(prompt, 2048):
        model(chunk, cache)
    token, position = torch.tensor([5], device="cuda"), torch.tensor([4096], device="cuda")
    out["decode_batch1_ctx4096"] = profile(lambda: model.decode_step(token, position, cache))
    batched = model.new_batched_cache(64, batch_context + 8)
    tokens = torch.randint(0, config.vocab_size - 1000, (64,), device="cuda")
    positions = torch.full((64,), batch_context, dtype=torch.long, device="cuda")
    out["decode_batch64"] = profile(lambda: model.decode_batch(tokens, positions, batched))
    prefill_cache = model.new_cache(2049)

    def run_prefill():
        prefill_cache.truncate(0)
        model(prompt[:2048], prefill_cache)

    out["prefill_2048"] = profile(run_prefill, repeats=1)
    return out


def _guarded(result: dict, what: str, fn, *args):
    """fn(*args), or None with the error noted: one failing figure must not cost the others (device time is scarce)."""
    try:
        return fn(*args)
    except Exception as exc:
        result["errors"].append(f"{what}: {exc!r}")
        print(f"{what} failed: {exc!r}", file=sys.stderr)
        torch.cuda.empty_cache()
        return None


def measure_kernel_engine(model, args) -> dict:
    """Every figure of the kernel engine, with its roofline (see the module docstring)."""
    config = model.config
    torch.cuda.synchronize()
    bandwidth, flops = copy_bandwidth(), gemm_flops()
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 GEMM {flops / 1e12:.0f} TFLOP/s", file=sys.stderr)
    result = {"copy_bandwidth_Bps": bandwidth, "gemm_bf16_flops": flops, "decode_batch1": [], "prefill": [],
              "decode_batched": [], "errors": []}
    steps = max(args.decode_tokens, 32)
    for context in (128, 4096):
        row = _guarded(result, f"decode batch 1 ctx {context}", decode_batch1, model, config, context, steps)
        if row is None:
            continue
        row["roofline_tok_s"] = bandwidth / decode_step_bytes(config, 1, context)
        row["pct_roofline"] = 100 * row["tok_s"] / row["roofline_tok_s"]
        result["decode_batch1"].append(row)
        print(f"decode batch 1 ctx {context}: {row['tok_s']:.0f} tok/s", file=sys.stderr)
    torch.cuda.empty_cache()
    for chunk in (2048, args.prefill_chunk):
        seconds = _guarded(result, f"prefill chunk {chunk}", prefill, model, config, 2048, chunk)
        if seconds is None:
            continue
        roofline = flops / prefill_flops_per_token(config, 2048)
        result["prefill"].append({"prompt_tokens": 2048, "chunk": chunk, "s": seconds, "tok_s": 2048 / seconds,
                                  "roofline_tok_s": roofline, "pct_roofline": 100 * 2048 / seconds / roofline})
        print(f"prefill 2048 (chunks of {chunk}): {2048 / seconds:.0f} tok/s", file=sys.stderr)
    model.decoder = None  # the batch-1 graphs are not needed any more
    torch.cuda.empty_cache()
    rows = _guarded(result, "batched decode", decode_batched, model, config, [8, 32, 64], args.batch_context, steps) or []
    for row in rows:
        row["roofline_tok_s"] = row["batch"] * bandwidth / decode_step_bytes(config, row["batch"], row["context"])
        row["pct_roofline"] = 100 * row["tok_s"] / row["roofline_tok_s"]
        print(f"decode batch {row['batch']}: {row['tok_s']:.0f} tok/s", file=sys.stderr)
    result["decode_batched"] = rows
    torch.cuda.empty_cache()
    paged = _guarded(result, "paged decode", decode_paged, model, config, [1, 8, 32, 64], args.batch_context, steps) or []
    for row, static in zip(paged, [None] + rows):
        row["static_tok_s"] = static["tok_s"] if static else result["decode_batch1"][0]["tok_s"] if result["decode_batch1"] else None
        print(f"paged decode batch {row['batch']}: {row['tok_s']:.0f} tok/s", file=sys.stderr)
    result["decode_paged"] = paged
    torch.cuda.empty_cache()
    if args.profile:
        try:
            result["profile"] = profiles(model, config, args.batch_context)
        except Exception as exc:  # keep the figures even if the profiler fails
            result["profile_error"] = repr(exc)
            print(f"profiler failed: {exc!r}", file=sys.stderr)
    return result


def print_kernel_engine(r: dict) -> None:
    gb = 1e9
    print(f"model      {r['preset']} (kernel engine: GraphedFastTransformer, CUDA graphs) on {r['device']} ({r['device_name']})")
    print(f"roofline   copy bandwidth {r['copy_bandwidth_Bps'] / gb:.0f} GB/s; bf16 GEMM {r['gemm_bf16_flops'] / 1e12:.0f} TFLOP/s")
    for error in r.get("errors", []):
        print(f"FAILED     {error}")
    print(f"weights    {r['weights_bytes'] / gb:.2f} GB held ({r['cuda_weights_allocated_bytes'] / gb:.2f} GB allocated by the load; "
          f"target <= {WEIGHTS_TARGET_BYTES / gb:.0f} GB); peak {r['cuda_peak_allocated_bytes'] / gb:.2f} GB")
    for row in r["decode_batch1"]:
        print(f"decode  batch 1  ctx {row['context']:>5}: {row['tok_s']:8.1f} tok/s  ({1e3 * row['s_per_token']:.3f} ms/token; "
              f"{row['pct_roofline']:.0f}% of {row['roofline_tok_s']:.0f} tok/s roofline; with the Engine's host sampler "
              f"{row['host_sampler_tok_s']:.0f} tok/s)")
    for row in r["prefill"]:
        print(f"prefill 2048 tokens, chunks of {row['chunk']:>4}: {row['tok_s']:8.0f} tok/s  ({row['pct_roofline']:.0f}% of "
              f"{row['roofline_tok_s']:.0f} tok/s at the measured GEMM rate)")
    for row in r["decode_batched"]:
        print(f"decode  batch {row['batch']:>2} ctx {row['context']:>5}: {row['tok_s']:8.0f} tok/s  "
              f"({1e3 * row['s_per_step']:.3f} ms/step; {row['pct_roofline']:.0f}% of {row['roofline_tok_s']:.0f} tok/s roofline)")
    if r.get("decode_paged"):
        seconds = r["decode_paged"][0]["prefill_2048_in_steps_s"]
        print(f"prefill 2048 tokens through forward_batch, steps of 512 (the Engine's path): {2048 / seconds:8.0f} tok/s")
    for row in r.get("decode_paged", []):
        static = f"{100 * row['tok_s'] / row['static_tok_s']:.0f}% of the static-cache graph's {row['static_tok_s']:.0f}" if row.get("static_tok_s") else "no static figure"
        mixed = (f"; a 448-token prompt chunk joining: {1e3 * row['mixed_step_s']:.1f} ms step"
                 + (f" (eager: {1e3 * row['mixed_step_eager_s']:.1f} ms)" if "mixed_step_eager_s" in row else "")
                 if "mixed_step_s" in row else "")
        print(f"paged   batch {row['batch']:>2} ctx {row['context']:>5}: {row['tok_s']:8.0f} tok/s  "
              f"({1e3 * row['s_per_step']:.3f} ms/step with host work and one argmax transfer; {static}{mixed})")
    mixed = next((row["mixed_profile"] for row in r.get("decode_paged", []) if "mixed_profile" in row), None)
    profiles = {"mixed_step_64_decodes_448_prefill": mixed} if mixed else {}
    for name, prof in (r.get("profile", {}) | profiles).items():
        print(f"profile {name}: {prof['gpu_us']:.0f} us of GPU kernels per call (eager)")
        for part in prof["by_part"]:
            print(f"    {part['share'] * 100:5.1f}%  {part['us']:9.1f} us  {part['part']}")
        for lin in prof["linear_by_shape"]:
            print(f"      linear {lin['shapes']} x{lin['calls']}: {lin['us']:.1f} us ({lin['share'] * 100:.1f}%)")


def _write_json(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "20b", "120b"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder: used if it holds one, else written there")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill step (as the engine does)")
    parser.add_argument("--impl", choices=["triton", "reference"],
                        help="model implementation (default: triton on CUDA, reference on CPU, as the Engine)")
    parser.add_argument("--batch-context", type=int, default=128, help="tokens already cached per sequence at batch > 1")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.profiler breakdown of the triton decode step and prefill")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=Path("bench_engine.json"), help="where to write the figures")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_engine: no CUDA GPU visible; use --device cpu", file=sys.stderr)
        return 1
    impl = args.impl or ("triton" if device.type == "cuda" else "reference")
    if impl == "triton" and device.type != "cuda":
        print("bench_engine: --impl triton measures the CUDA-graph kernel engine; it needs --device cuda", file=sys.stderr)
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
        if impl == "triton":
            from kubrick.engine.fast_model import GraphedFastTransformer

            model = GraphedFastTransformer(config, weights)
        else:
            model = Transformer(config, weights)
        del weights
        sync(device)
        load_s = time.perf_counter() - start
        result = {
            "preset": args.preset,
            "impl": impl,
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
        if impl == "triton":
            result.update(measure_kernel_engine(model, args))
            result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            _write_json(args.json, result)
            print_kernel_engine(result)
            print(f"(figures in {args.json})")
            return 0
        with torch.inference_mode():
            result.update(measure(model, device, args.prompt_tokens, args.decode_tokens, args.prefill_chunk))
        if device.type == "cuda":
            result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)

    _write_json(args.json, result)
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
