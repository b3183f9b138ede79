#!/usr/bin/env python
"""Experiment (issue 5, 2026-11-24): the next linear GEMV's weights prefetched into L2 from a side branch of the
batch-1 decode graph. Not kept: it gained 0.3 % at best.

Between the weight-streaming GEMVs of a batch-1 step sit latency-bound small kernels (RoPE, attention, norms,
router) that leave DRAM idle. A prefetch kernel (`cp.async.bulk.prefetch.L2`, 16 KB a thread) on a second stream,
forked after a GEMV and joined at the step's end, asks L2 for weights a later GEMV reads:

  A   after qkv(l), the out-projection's weights of layer l (read during RoPE and the attention);
  B   after out(l), qkv(l+1) (beside the router and the MoE);
  R   after norm_router(l), qkv(l+1) (beside the MoE);   AR both A and R;   -hint: with an evict_last policy;
  R-half: only the first half of qkv(l+1).

  python scripts/experiments/l2_prefetch_branch.py          # H100: the probe, then every variant twice

The probe times the out-projection GEMV alone from DRAM, L2-hot and after a finished prefetch. Each variant runs
in a process of its own (a failed capture would poison the next one). Results: BENCHMARKS.md run 40, section 8.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_decode  # noqa: E402
import bench_kernels  # noqa: E402
from kubrick.engine import fast_model  # noqa: E402
from kubrick.engine.kernels.linear import linear  # noqa: E402

VARIANTS = {"base": ("", {}), "A": ("A", {}), "B": ("B", {}), "R": ("R", {}), "AR": ("AR", {}),
            "A-hint": ("A", {"HINT": True}), "AR-hint": ("AR", {"HINT": True}), "R-half": ("R", {"FRACTION": 0.5})}
CHUNK = 16384  # bytes one thread asks for


@triton.jit
def _prefetch_kernel(base, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, HINT: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offset = i.to(tl.int64) * CHUNK
    valid = (offset < nbytes).to(tl.int32)
    size = tl.minimum(nbytes - offset, CHUNK).to(tl.int32)
    if HINT:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 pol; setp.ne.b32 p, $2, 0; createpolicy.fractional.L2::evict_last.b64 pol, 1.0;"
            " @p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $3, pol; mov.b32 $0, 0; }",
            "=r,l,r,r", [base + offset, valid, size], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
            "=r,l,r,r", [base + offset, valid, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(t: torch.Tensor, fraction: float = 1.0, hint: bool = False) -> None:
    nbytes = int(t.numel() * t.element_size() * fraction) // 16 * 16
    _prefetch_kernel[(triton.cdiv(triton.cdiv(nbytes, CHUNK), 128),)](t.data_ptr(), nbytes, CHUNK=CHUNK, BLOCK=128,
                                                                      HINT=hint, num_warps=4)


def probe() -> None:
    ws = [torch.randn(2880, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(8)]  # 8 x 23.6 MB > L2
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    time = bench_kernels.time_per_call
    cold = time([lambda w=w: linear(x, w) for w in ws]) * 1e6
    hot = time([lambda: linear(x, ws[0]) for _ in ws]) * 1e6
    alone = time([lambda w=w: prefetch(w) for w in ws]) * 1e6
    sleep = time([lambda: torch.cuda._sleep(20000) for _ in ws]) * 1e6
    after = time([lambda w=w: (prefetch(w), torch.cuda._sleep(20000), linear(x, w)) for w in ws]) * 1e6
    print(f"probe, the out-projection GEMV (2880 x 4096 bf16): from DRAM {cold:.2f} us, L2-hot {hot:.2f} us; the "
          f"prefetch alone {alone:.2f} us; prefetch, wait, GEMV {after - sleep:.2f} us (less the wait)", flush=True)


def install(model, mode: str, fraction: float, hint: bool) -> None:
    """Fork prefetches onto a side stream as `mode` says (see the module docstring); join at the step's end."""
    w, layers = model.w, model.config.num_hidden_layers
    after_linear, after_router = {}, {}
    for layer in range(layers):
        if "A" in mode:
            after_linear[w[f"block.{layer}.attn.qkv.weight.rope_pairs"].data_ptr()] = w[f"block.{layer}.attn.out.weight"]
        if layer + 1 < layers:
            following = w[f"block.{layer + 1}.attn.qkv.weight.rope_pairs"]
            if "B" in mode:
                after_linear[w[f"block.{layer}.attn.out.weight"].data_ptr()] = following
            if "R" in mode:
                after_router[w[f"block.{layer}.mlp.gate.weight"].data_ptr()] = following
    side = torch.cuda.Stream()

    def fork(t):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            prefetch(t, fraction, hint)

    def linear_then_fork(x, weight, bias=None, residual=None, config=None):
        y = linear(x, weight, bias, residual, config)
        if x.shape[0] == 1 and weight.data_ptr() in after_linear:
            fork(after_linear[weight.data_ptr()])
        return y

    def router_then_fork(x, y, norm_weight, eps, weight, *args, _router=fast_model.norm_router, **kwargs):
        out = _router(x, y, norm_weight, eps, weight, *args, **kwargs)
        if x.shape[0] == 1 and weight.data_ptr() in after_router:
            fork(after_router[weight.data_ptr()])
        return out

    def run_and_join(self, *args, _run=fast_model.FastTransformer._run, **kwargs):
        out = _run(self, *args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    fast_model.linear, fast_model.norm_router = linear_then_fork, router_then_fork
    fast_model.FastTransformer._run = run_and_join


def measure(label: str) -> None:
    mode, options = VARIANTS[label]
    config, model = bench_kernels.random_20b_model()
    if mode:
        install(model, mode, options.get("FRACTION", 1.0), options.get("HINT", False))
    print(f"{label:8s} batch 1: context 128 {bench_decode.batch_one(model, config, 128):.1f} tok/s, context 4096 "
          f"{bench_decode.batch_one(model, config, 4096):.1f} tok/s", flush=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        measure(sys.argv[2])
        return 0
    if not torch.cuda.is_available():
        print("l2_prefetch_branch.py needs a CUDA GPU (sm90: cp.async.bulk)", file=sys.stderr)
        return 2
    probe()
    for _ in range(2):
        for label in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", label], capture_output=True, text=True,
                             check=False)
            print(out.stdout.strip() if out.returncode == 0 else f"{label} failed: {out.stderr[-400:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
