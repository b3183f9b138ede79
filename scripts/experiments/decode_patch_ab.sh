#!/bin/bash
# A decode-speed A/B of experiments kept as patches: `python3 scripts/bench_decode.py` (batch 1 at contexts 128 and
# 4096, static batch 8 and 64) on the tree as it is and with the patches applied together, alternated twice in
# one call, on a GPU. The patches are taken out again on exit.
#
#   bash scripts/experiments/decode_patch_ab.sh scripts/experiments/out_proj_late_launch.patch [more.patch ...]
set -u
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: decode_patch_ab.sh PATCH [PATCH ...]" >&2; exit 2; }
name=$(for p in "$@"; do basename "$p" .patch; done | paste -sd+)
applied=0
apply() { git apply "$@" && applied=1; }
revert() { if [ $applied = 1 ]; then git apply -R "$@" && applied=0; fi; }
git apply --check "$@" || { echo "the patches do not apply to this tree together" >&2; exit 1; }
trap 'revert "$@"' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
for round in 1 2; do
    python3 scripts/bench_decode.py --label tree 2>&1 | tail -1
    apply "$@" || exit 1
    python3 scripts/bench_decode.py --label "$name" 2>&1 | tail -1
    revert "$@" || exit 1
done
date -u
