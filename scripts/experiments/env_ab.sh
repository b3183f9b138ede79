#!/usr/bin/env bash
# A serving setting A/B: the 64-client level of bench_serving.py's fixed mix (REQUESTS a client, default 4) under
# each environment setting in turn, alternating twice, on one machine and one checkpoint. Settings are
# space-separated VAR=VALUE lists, one argument each:
#
#   scripts/experiments/env_ab.sh OUTDIR "KUBRICK_STEP_TOKENS=512" "KUBRICK_STEP_TOKENS=1024"
#       # on the GPU machine, after scripts/bench_serving_gpu.sh has installed the serving wheels and written
#       # /tmp/ck20 (or: python3 -m pip install --no-index --no-deps -q .gpus/*.whl, a kubrick-src.pth, and
#       # python3 -m kubrick.cli make-checkpoint /tmp/ck20 --preset 20b)
#
# Knobs (environment): CONCURRENCY (default 64), REQUESTS (default 4), ROUNDS (default 2), LIMIT (seconds a run,
# default 170). Every run starts from KUBRICK_MAX_BATCH=128 KUBRICK_STEP_TOKENS=512 (bench_serving_gpu.sh's).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=$(mkdir -p "${1:?usage: env_ab.sh OUTDIR SETTING...}" && cd "$1" && pwd)
shift
if [ -f .gpus/vocab/o200k_base.tiktoken.gz ] && [ ! -f .gpus/vocab/o200k_base.tiktoken ]; then
    gunzip -k .gpus/vocab/o200k_base.tiktoken.gz  # carried gzipped (scripts/make_serving_carry.sh)
fi
[ -f .gpus/vocab/o200k_base.tiktoken ] && export TIKTOKEN_ENCODINGS_BASE=$PWD/.gpus/vocab
for round in $(seq "${ROUNDS:-2}"); do
    for setting in "$@"; do
        name=$(echo "$setting" | tr ' =' '_-')-$round
        # shellcheck disable=SC2086  # the setting is a list of VAR=VALUE words
        env KUBRICK_MAX_BATCH=128 KUBRICK_STEP_TOKENS=512 $setting timeout "${LIMIT:-170}" python3 \
            scripts/bench_serving.py --checkpoint /tmp/ck20 --device cuda:0 --context-length 4096 \
            --concurrency "${CONCURRENCY:-64}" --requests "${REQUESTS:-4}" --max-tokens 512 \
            --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
        python3 -c "import json
for r in json.load(open('$OUT/$name.json')): print('$setting', r['clients'], {k: round(r[k], 1) for k in
    ('output_tok_per_s', 'ttft_p50_ms', 'ttft_p99_ms', 'itl_p50_ms', 'itl_p99_ms', 'stream_tok_per_s_p50')},
    'errors', r['errors'])" || tail -5 "$OUT/$name.txt"
    done
done
