#!/usr/bin/env bash
# Experiment (issue 6, 2026-11-24): several response threads ("lanes") in llm_decoupled instead of one. Not kept.
#
# The Triton model's one response thread sends every stream's text; each send is a round trip to the server
# process (the GIL free meanwhile), and at 64 streams the thread sent ~40 responses a batch and fell behind the
# 7 ms decode steps. response_lanes.patch gives each request one of KUBRICK_RESPONSE_THREADS lanes (round robin;
# a request's events stay on its lane, in order). This applies the patch to a copy of the tree (a git worktree)
# and runs the 64-client level with 4 lanes and with 1, alternating twice, then twice more with the server on
# two CPUs. Results: BENCHMARKS.md run 41, section 4 (no dropped connections, unlike the try of 2026-11-23, but
# 11-32 % fewer tokens a second: the lanes' Python contends with the engine thread for the GIL).
#
#   scripts/experiments/response_lanes.sh OUTDIR      # on the GPU machine, after scripts/bench_serving_gpu.sh
#                                                     # has installed the serving wheels and written /tmp/ck20
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=$(mkdir -p "${1:?usage: response_lanes.sh OUTDIR}" && cd "$1" && pwd)
COPY=$(mktemp -d)/tree
PTH=$(python3 -c 'import site; print(site.getsitepackages()[0])')/kubrick-src.pth  # where the stub finds kubrick
# A copy of the tree as it is (not a git worktree: the GPU machine's checkout may have no history of this commit).
mkdir -p "$COPY" && cp -r kubrick triton scripts pyproject.toml "$COPY"/
trap 'echo "$PWD" > "$PTH"; rm -rf "$(dirname "$COPY")"' EXIT
(cd "$COPY" && git apply "$OLDPWD/scripts/experiments/response_lanes.patch") || exit 1
echo "$COPY" > "$PTH"
[ -f .gpus/vocab/o200k_base.tiktoken ] && export TIKTOKEN_ENCODINGS_BASE=$PWD/.gpus/vocab
export KUBRICK_MAX_BATCH=128 KUBRICK_STEP_TOKENS=512
run() {  # NAME LANES [bench_serving options]
    local name=$1 lanes=$2
    shift 2
    (cd "$COPY" && KUBRICK_RESPONSE_THREADS=$lanes KUBRICK_STEP_TRACE=$OUT/$name.trace.jsonl timeout 150 \
        python3 scripts/bench_serving.py --checkpoint /tmp/ck20 --device cuda:0 --context-length 4096 --concurrency 64 \
        --requests 2 --max-tokens 512 --json "$OUT/$name.json" --server-log "$OUT/$name.server.log" "$@" > "$OUT/$name.txt" 2>&1)
    python3 -c "import json; r = json.load(open('$OUT/$name.json'))[0]; print('$name', {k: round(r[k], 1) for k in
        ('output_tok_per_s', 'ttft_p50_ms', 'itl_p50_ms', 'itl_p99_ms')}, 'errors', r['errors'])"
    python3 scripts/step_trace.py "$OUT/$name.trace.jsonl" | grep -A1 "respond (server)"
}
run lanes4-a 4; run lanes1-a 1; run lanes4-b 4; run lanes1-b 1
run lanes4-2cpus 4 --server-cpus 0,1; run lanes1-2cpus 1 --server-cpus 0,1
