#!/bin/bash
# A/B of the QKV GEMV with RoPE + KV write in its epilogue (BENCHMARKS.md run 46) against the tree before it,
# alternated twice in one call on a GPU. The tree before travels as untracked files:
#
#   mkdir -p ab_old && for f in kubrick/engine/fast_model.py kubrick/engine/kernels/rope.py \
#       kubrick/engine/kernels/linear.py; do git show 7795a21:$f > ab_old/$(basename $f); done
#   bash scripts/experiments/qkv_rope_ab.sh ab_old        (then rm -r ab_old)
set -u
old=${1:?usage: qkv_rope_ab.sh DIR_WITH_THE_OLD_FILES}
new=$(mktemp -d)
cp kubrick/engine/fast_model.py kubrick/engine/kernels/rope.py kubrick/engine/kernels/linear.py "$new"/
put() { cp "$1"/fast_model.py kubrick/engine/; cp "$1"/rope.py "$1"/linear.py kubrick/engine/kernels/; }
trap 'put "$new"' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
for round in 1 2; do
    put "$old"; python3 scripts/bench_decode.py --label before 2>&1 | tail -1
    put "$new"; python3 scripts/bench_decode.py --label fused 2>&1 | tail -1
done
date -u
