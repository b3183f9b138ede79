#!/bin/bash
# A decode-speed A/B of a setting: `python3 scripts/bench_decode.py` (batch 1 at contexts 128 and 4096, static
# batch 8 and 64) with the environment as it is and with the given assignments, alternated twice in one call,
# on a GPU.
#
#   bash scripts/experiments/decode_env_ab.sh KUBRICK_NORM_IN_MLP2=0 [MORE=1 ...]
set -u
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: decode_env_ab.sh NAME=VALUE [NAME=VALUE ...]" >&2; exit 2; }
name=$(printf '%s\n' "$@" | paste -sd+)
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
for round in 1 2; do
    python3 scripts/bench_decode.py --label default 2>&1 | tail -1
    env "$@" python3 scripts/bench_decode.py --label "$name" 2>&1 | tail -1
done
date -u
