#!/bin/bash
# A decode-speed A/B of an experiment kept as a patch: `python3 scripts/bench_decode.py` (batch 1 at contexts 128
# and 4096, static batch 8 and 64) on the tree as it is and with the patch applied, alternated twice in one call,
# on a GPU. The patch is taken out again on exit.
#
#   bash scripts/experiments/decode_patch_ab.sh scripts/experiments/out_proj_late_launch.patch
set -u
cd "$(dirname "$0")/../.."
patch=${1:?usage: decode_patch_ab.sh PATCH}
name=$(basename "$patch" .patch)
git apply --check "$patch" || { echo "$patch does not apply to this tree" >&2; exit 1; }
trap 'git apply -R "$patch" 2>/dev/null' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
for round in 1 2; do
    python3 scripts/bench_decode.py --label tree 2>&1 | tail -1
    git apply "$patch" || exit 1
    python3 scripts/bench_decode.py --label "$name" 2>&1 | tail -1
    git apply -R "$patch" || exit 1
done
date -u
