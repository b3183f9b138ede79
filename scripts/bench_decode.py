#!/usr/bin/env python
"""Quick decode timing for A/B runs on a GPU: one line of tok/s at the gpt-oss-20b shape (random weights).

  batch 1 at contexts 128 and 4096 (CudaGraphDecoder, 64 steps, best of 2) and the static batched graph at
  batch 8 and 64 (CudaGraphBatchDecoder at context 1024, bench_engine's decode_batched).

An A/B alternates two trees in one call, e.g. against the last commit's attention kernel:

  git show HEAD:kubrick/engine/kernels/attention.py > /tmp/old.py; cp kubrick/engine/kernels/attention.py /tmp/new.py
  for r in 1 2; do cp /tmp/old.py kubrick/engine/kernels/attention.py; python3 scripts/bench_decode.py --label old
                   cp /tmp/new.py kubrick/engine/kernels/attention.py; python3 scripts/bench_decode.py --label new; done

--timeline prints, instead, where the batch-1 graph step's time goes kernel by kernel (torch.profiler over 6
replays at contexts 128 and 4096; then the static batch-64 step at context 1024): under programmatic dependent
launch a kernel starts while the one before still runs, so durations overlap; a kernel's *increment*, its end
minus the latest end before it, is what it adds to the step, and the increments sum to the step.

--skip rope,norm,combine,router leaves those kernels out of the step (RoPE + KV write, at one token the QKV GEMV's
epilogue; the attention's RMSNorm; the attention's split combine; norm_router, the MoE's residual add, norm and
router, its experts then picked by position): the numbers are wrong, the time is what the step would take if
fusing them away cost nothing, the upper bound of such a fusion.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_engine  # noqa: E402
import bench_kernels  # noqa: E402
import kubrick.engine.fast_model as fast_model  # noqa: E402
from kubrick.engine.kernels import attention  # noqa: E402

SKIPPABLE = ("rope", "norm", "combine", "router")


def skip_kernels(names: set[str]) -> None:
    """Replace the named kernels by launches that do nothing (see the module docstring)."""
    if "rope" in names:  # the QKV projection alone (at one token the GEMV without its RoPE epilogue)
        def no_rope(x, weight, bias, cos, sin, rows, keys, values, q_heads, kv_heads, out=None):
            qkv = fast_model.linear(x, weight, bias)
            return qkv[:, : q_heads * (qkv.shape[1] // (q_heads + 2 * kv_heads))].view(qkv.shape[0], q_heads, -1)
        fast_model.qkv_rope_cache = no_rope
    if "norm" in names:
        def no_norm(x, weight, eps, dtype=None, **_):
            if x.dtype == dtype:
                return x
            if x.shape[0] > 1 and x.dtype == torch.float32 and dtype == torch.bfloat16:
                # The float32 stream's high halves (its bf16 truncation, a view): the routing stays spread over
                # the experts as real data spreads it (garbage may pick the same few, which reads fewer weights).
                return x.view(torch.bfloat16)[..., 1::2]
            return torch.empty(x.shape, dtype=dtype, device=x.device)  # one token reads 4 experts whatever it holds
        fast_model.rmsnorm = no_norm
    if "router" in names:  # the MoE block's input side (residual add, norm, router): experts picked by position
        picks = {}  # made at warm-up, before capture: no kernel of their own in the graphs

        def no_router(x, attention, norm_weight, eps, weight, bias, k, stream=None, gemv_out=None, **_):
            n = x.shape[0]  # token i takes experts 4i .. 4i + 3 (mod the count): spread as routing spreads them
            if (n, k) not in picks:
                ids = (torch.arange(n * k, device=x.device) % weight.shape[0]).to(torch.int32).view(n, k)
                picks[n, k] = ids, torch.full((n, k), 1.0 / k, device=x.device)
            return torch.empty_like(attention), *picks[n, k]
        fast_model.norm_router = no_router
    if "combine" in names:
        attention.MERGE_SPLITS = 0  # every split count above one then goes to the combine kernel, skipped here

        class NoLaunch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None
        attention._decode_combine_kernel = NoLaunch()


def graph_decoder(model, config, context: int, capacity: int):
    """(CudaGraphDecoder, its cache, the next token) after a random `context`-token prompt and 3 warm-up steps."""
    cache = model.new_cache(capacity)
    prompt = torch.randint(0, config.vocab_size, (context,), device="cuda")
    for chunk in torch.split(prompt, 2048):
        logits = model(chunk, cache)
    token = logits[-1].argmax().view(1)
    decoder = fast_model.CudaGraphDecoder(model, cache)
    for _ in range(3):
        token = decoder.step(token)[-1].argmax().view(1)
    return decoder, cache, token


def batch_one(model, config, context: int, steps: int = 64) -> float:
    decoder, cache, token = graph_decoder(model, config, context, context + 4 * steps)
    best = 0.0
    for _ in range(2):
        cache.truncate(context + 3)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            token = decoder.step(token)[-1].argmax().view(1)
        end.record()
        end.synchronize()
        best = max(best, steps * 1e3 / start.elapsed_time(end))
    return best


def kernel_increments(events: list[tuple[str, float, float]]) -> tuple[dict[str, float], dict[str, float], float]:
    """Kernel events (name, start, duration) of a stretch of steps -> (increment by name, duration by name, idle):
    a kernel's increment is its end minus the latest end of the kernels before it (0 if it ends inside them);
    idle is the time no kernel ran. The increments of all kernels but the first add up to the stretch."""
    increments: dict[str, float] = {}
    durations: dict[str, float] = {}
    latest_end, idle = None, 0.0
    for name, start, duration in sorted(events, key=lambda e: e[1]):
        end = start + duration
        if latest_end is not None:
            increments[name] = increments.get(name, 0.0) + max(end - latest_end, 0.0)
            idle += max(start - latest_end, 0.0)
        durations[name] = durations.get(name, 0.0) + duration
        latest_end = end if latest_end is None else max(latest_end, end)
    return increments, durations, idle


def profiled_kernels(step, steps: int) -> list[dict]:
    """Run `step` `steps` times under torch.profiler -> its GPU kernels (chrome-trace events: name, ts, dur in
    µs), by start."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        with open(trace.name) as f:
            kernels = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    return sorted(kernels, key=lambda e: e["ts"])


def override_table(spec: str) -> None:
    """KERNEL={json}: merge the entry into that kernel's sm90 block-table entry (to time other blocks; nested
    dicts such as MLP2 replace the entry's whole one)."""
    from kubrick.engine.kernels import _common

    kernel, entry = spec.split("=", 1)
    _common._TABLE["sm90"][kernel].update(json.loads(entry))


def profiled_increments(step, steps: int, label: str) -> None:
    """Run `step` `steps` times under torch.profiler and print its kernels by increment (the first step dropped,
    its start follows the profiler's)."""
    kernels = profiled_kernels(step, steps)
    kept = kernels[len(kernels) // steps:]
    increments, durations, idle = kernel_increments([(e["name"][:70], e["ts"], e["dur"]) for e in kept])
    n = steps - 1
    print(f"{label}: {sum(increments.values()) / n:.1f} us a step, of which no kernel running "
          f"{idle / n:.1f} us (increment / duration per step, by kernel)", flush=True)
    for name, us in sorted(increments.items(), key=lambda kv: -kv[1]):
        print(f"  {us / n:8.1f} us  {durations[name] / n:8.1f} us  {name}", flush=True)


def timeline(model, config, context: int, steps: int = 6) -> None:
    """Print the batch-1 graph step's kernels by increment (see the module docstring)."""
    decoder, cache, token = graph_decoder(model, config, context, context + 4 * steps + 8)
    state = {"token": token}

    def step():
        state["token"] = decoder.step(state["token"])[-1].argmax().view(1)

    profiled_increments(step, steps, f"batch 1, context {context}")
    del decoder, cache


def timeline_batched(model, config, batch: int, context: int = 1024, steps: int = 6) -> None:
    """The same for the static batched graph step at `batch` sequences of `context` tokens (as bench_decode's
    batch figures run it)."""
    decoder = bench_engine.batched_decoder(model, [batch], context, steps + 2)
    step = bench_engine.greedy_batch_step(decoder, config, batch, context)
    for _ in range(2):
        step()
    profiled_increments(step, steps, f"static batch {batch}, context {context}")
    del decoder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="", help="printed first on the line")
    parser.add_argument("--skip", default="", help=f"comma-separated kernels to leave out: {', '.join(SKIPPABLE)}")
    parser.add_argument("--timeline", action="store_true",
                        help="where the batch-1 and batch-64 steps' time goes, kernel by kernel")
    args = parser.parse_args()
    skip = {name for name in args.skip.split(",") if name}
    if skip - set(SKIPPABLE):
        print(f"--skip takes {', '.join(SKIPPABLE)}; got {', '.join(sorted(skip - set(SKIPPABLE)))}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    skip_kernels(skip)
    config, model = bench_kernels.random_20b_model()
    if args.timeline:
        for context in (128, 4096):
            timeline(model, config, context)
        timeline_batched(model, config, 64)
        return 0
    figures = [f"b1 ctx128 {batch_one(model, config, 128):.1f}", f"b1 ctx4096 {batch_one(model, config, 4096):.1f}"]
    figures += [f"b{row['batch']} {row['tok_s']:.0f}"
                for row in bench_engine.decode_batched(model, config, [8, 64], 1024, 32)]
    head = ([args.label] if args.label else []) + (["skip " + ",".join(sorted(skip))] if skip else [])
    print("  ".join(head + figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
