#!/usr/bin/env bash
# Experiment (issue 6, 2026-11-24): the response thread paces each stream's text when many streams run.
#
# At 64 streams the Triton model's response thread cannot send every stream's token of every ~7 ms step (a send
# is a round trip to the server process, 0.2-1 ms under contention), and its long batches make the clients'
# ITL tail (BENCHMARKS.md run 42, section 5). paced_sends.patch (kubrick/server/outbox.py `paced`, used by
# llm_decoupled's response thread): with more than 32 requests in flight, a stream's text goes out at most every
# 12 ms; text held back joins the next batch, merged with what came since. This applies the patch to a copy of
# the tree and runs the 64-client level with and without it, alternating twice. Results: BENCHMARKS.md run 42.
#
#   scripts/experiments/paced_sends.sh OUTDIR      # on the GPU machine, after scripts/bench_serving_gpu.sh
#                                                  # has installed the serving wheels and written /tmp/ck20
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=$(mkdir -p "${1:?usage: paced_sends.sh OUTDIR}" && cd "$1" && pwd)
COPY=$(mktemp -d)/tree
PTH=$(python3 -c 'import site; print(site.getsitepackages()[0])')/kubrick-src.pth  # where the stub finds kubrick
# A copy of the tree as it is (not a git worktree: the GPU machine's checkout may have no history of this commit).
mkdir -p "$COPY" && cp -r kubrick triton scripts pyproject.toml "$COPY"/
trap 'echo "$PWD" > "$PTH"; rm -rf "$(dirname "$COPY")"' EXIT
(cd "$COPY" && git apply "$OLDPWD/scripts/experiments/paced_sends.patch") || exit 1
[ -f .gpus/vocab/o200k_base.tiktoken ] && export TIKTOKEN_ENCODINGS_BASE=$PWD/.gpus/vocab
export KUBRICK_MAX_BATCH=128 KUBRICK_STEP_TOKENS=512
run() {  # NAME TREE
    local name=$1 tree=$2
    echo "$tree" > "$PTH"
    (cd "$tree" && KUBRICK_STEP_TRACE=$OUT/$name.trace.jsonl timeout 150 python3 scripts/bench_serving.py \
        --checkpoint /tmp/ck20 --device cuda:0 --context-length 4096 --concurrency 64 --requests 2 --max-tokens 512 \
        --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1)
    python3 -c "import json; r = json.load(open('$OUT/$name.json'))[0]; print('$name', {k: round(r[k], 1) for k in
        ('output_tok_per_s', 'ttft_p50_ms', 'itl_p50_ms', 'itl_p99_ms')}, 'errors', r['errors'])"
    python3 scripts/step_trace.py "$OUT/$name.trace.jsonl" | grep -E "respond \(server\)|gaps between"
}
run paced-a "$COPY"; run plain-a "$PWD"; run paced-b "$COPY"; run plain-b "$PWD"
