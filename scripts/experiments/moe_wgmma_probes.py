#!/usr/bin/env python3
"""Experiment (issue 6, 2026-11-24): what holds sm90's Gluon MoE back in a mixed step (512 tokens: moe_wgmma_mid,
~180 TFLOP/s)? Timing probes, each with wrong numbers, beside the real kernel (bench_kernels.sweep_wgmma):
  PROBE 1  the weights read as one contiguous run per tile (what their scattered rows cost; run 37's probe)
  PROBE 2  the activations loaded by the prologue only (what re-reading x from L2 for every row block costs:
           at 512 tokens each CTA reads 368 KB of x against 184 KB of weights)
  PROBE 3  no MXFP4 decode (the scales stand in for the weights: what the decode's instructions cost)
  PROBE 4  2 and 3 together
Needs moe_wgmma_probes.patch applied (the probes 2-4 in the kernel):
  git apply scripts/experiments/moe_wgmma_probes.patch && python3 scripts/experiments/moe_wgmma_probes.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench_kernels  # noqa: E402

MID = dict(BLOCK_M=64, BLOCK_N=128, STAGES=4, SUB=1, num_warps=4)
SMALL = dict(BLOCK_M=16, BLOCK_N=64, STAGES=2, SUB=5, num_warps=4)
bench_kernels.WGMMA_SWEEP = [dict(cfg, PROBE=probe) for cfg in (SMALL, MID) for probe in (0, 1, 2, 3, 4)]
bench_kernels.sweep_wgmma(8, token_counts=(64, 512))
