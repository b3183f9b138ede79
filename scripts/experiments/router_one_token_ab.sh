#!/bin/bash
# norm_router at one token with fewer, wider programs whose slice of the router weights is one step loaded before
# the PDL wait (scripts/experiments/router_one_token.patch: KUBRICK_ROUTER_ONE_TOKEN="splits,block_k,num_warps"):
# `python3 scripts/bench_decode.py` with the default and each spec, alternated twice in one call, on a GPU.
#
#   bash scripts/experiments/router_one_token_ab.sh 1,4096,32 2,2048,16
set -u
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: router_one_token_ab.sh SPLITS,BLOCK_K,WARPS [...]" >&2; exit 2; }
git apply scripts/experiments/router_one_token.patch || exit 1
trap 'git apply -R scripts/experiments/router_one_token.patch' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
for round in 1 2; do
    python3 scripts/bench_decode.py --label default 2>&1 | tail -1
    for spec in "$@"; do
        KUBRICK_ROUTER_ONE_TOKEN="$spec" python3 scripts/bench_decode.py --label "router $spec" 2>&1 | tail -1
    done
done
date -u
