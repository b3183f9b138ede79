#!/usr/bin/env bash
# Experiment (issue 6, 2026-11-24): Nsight Compute's view of sm90's Gluon MoE (moe_wgmma.py) where the serving
# steps use it: the moe_wgmma_mid tiles at 512 tokens (a prompt chunk beside 64 decodes) and the moe_wgmma tiles
# at 64 tokens (a decode step of 64). Speed of light, occupancy, warp stall reasons and memory, for mlp1 of the
# third call (the first two compile and warm up). On the GPU machine (ncu needs its Firecracker runtime):
#   bash scripts/experiments/moe_wgmma_ncu.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=$(mkdir -p "${1:?usage: moe_wgmma_ncu.sh OUTDIR}" && cd "$1" && pwd)
for case in "512 moe_wgmma_mid" "64 moe_wgmma"; do
    set -- $case
    timeout 240 ncu --clock-control none -k regex:_mlp1_wgmma_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        python3 - "$1" "$2" > "$OUT/ncu_mlp1_$1.txt" 2>&1 <<'PY'
import sys
import torch
sys.path.insert(0, "scripts")
from bench_kernels import moe_weights, routing, HIDDEN, BF16
from kubrick.engine.kernels._common import block_config
from kubrick.engine.kernels.moe_wgmma import moe_wgmma
tokens, table = int(sys.argv[1]), sys.argv[2]
x = torch.randn(tokens, HIDDEN, device="cuda", dtype=BF16)
ids, weights = routing(tokens, 0)
experts = moe_weights(1)[0]
for _ in range(3):
    moe_wgmma(x, ids, weights, *experts, config=block_config(table, x.device))
torch.cuda.synchronize()
PY
    echo "== $case: exit $?"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|Issued Warp|No Eligible|Active Warps Per|L2 Hit|DRAM Throughput|Block Limit|Theoretical Occ" "$OUT/ncu_mlp1_$1.txt" | head -40
    echo "-- warp stall reasons (cycles a warp spends per issued instruction, the larger ones):"
    grep -E "issue_stalled_.*ratio" "$OUT/ncu_mlp1_$1.txt" | awk '$NF+0 >= 0.2' | sed -E 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' 
done
