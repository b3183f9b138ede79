#!/usr/bin/env bash
# An experiment kept as a patch, against the tree as it is: the 64-client serving level (bench_serving.py's fixed
# mix, 2 requests a client, step trace on), with the patch and without, alternating twice. Each .patch file here
# says at its top what it tries and where its results are (BENCHMARKS.md).
#
#   scripts/experiments/patch_ab.sh scripts/experiments/quiet_sends.patch OUTDIR
#       # on the GPU machine, after scripts/bench_serving_gpu.sh has installed the serving wheels and written /tmp/ck20
#
# Knobs (environment): CONCURRENCY (default 64; a list like 1,64 runs each level in turn), SAMPLING (more
# bench_serving.py flags, e.g. "--temperature 1 --top-p 0.9"; default greedy).
set -uo pipefail
cd "$(dirname "$0")/../.."
PATCH=$(cd "$(dirname "${1:?usage: patch_ab.sh PATCH OUTDIR}")" && pwd)/$(basename "$1")
OUT=$(mkdir -p "${2:?usage: patch_ab.sh PATCH OUTDIR}" && cd "$2" && pwd)
NAME=$(basename "$PATCH" .patch)
COPY=$(mktemp -d)/tree
PTH=$(python3 -c 'import site; print(site.getsitepackages()[0])')/kubrick-src.pth  # where the stub finds kubrick
# A copy of the tree as it is (not a git worktree: the GPU machine's checkout may have no history of this commit).
mkdir -p "$COPY" && cp -r kubrick triton scripts pyproject.toml "$COPY"/
trap 'echo "$PWD" > "$PTH"; rm -rf "$(dirname "$COPY")"' EXIT
(cd "$COPY" && git apply "$PATCH") || exit 1
if [ -f .gpus/vocab/o200k_base.tiktoken.gz ] && [ ! -f .gpus/vocab/o200k_base.tiktoken ]; then
    gunzip -k .gpus/vocab/o200k_base.tiktoken.gz  # carried gzipped; a new call's carry has only the .gz
fi
[ -f .gpus/vocab/o200k_base.tiktoken ] && export TIKTOKEN_ENCODINGS_BASE=$PWD/.gpus/vocab
export KUBRICK_MAX_BATCH=128 KUBRICK_STEP_TOKENS=512
run() {  # LABEL TREE
    local name=$1 tree=$2
    echo "$tree" > "$PTH"
    (cd "$tree" && KUBRICK_STEP_TRACE=$OUT/$name.trace.jsonl timeout 150 python3 scripts/bench_serving.py \
        --checkpoint /tmp/ck20 --device cuda:0 --context-length 4096 --concurrency "${CONCURRENCY:-64}" --requests 2 \
        --max-tokens 512 ${SAMPLING:-} --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1)
    python3 -c "import json
for r in json.load(open('$OUT/$name.json')): print('$name', r['clients'], {k: round(r[k], 1) for k in
    ('output_tok_per_s', 'ttft_p50_ms', 'itl_p50_ms', 'itl_p99_ms', 'stream_tok_per_s_p50')}, 'errors', r['errors'])"
    python3 scripts/step_trace.py "$OUT/$name.trace.jsonl" | grep -E "respond \(server\)|gaps between"
}
run "$NAME-a" "$COPY"; run plain-a "$PWD"; run "$NAME-b" "$COPY"; run plain-b "$PWD"
