#!/usr/bin/env bash
# The whole GPU serving measurement of issue 6 in one command (device time is scarce), through the real Triton
# server: bench_serving.py at concurrency 1,8,32,64,128 (the fixed mix in its docstring) and bench_multiturn.py
# (TTFT per turn with prefix reuse on, then off), on a random gpt-oss-20b-shaped checkpoint. Ends inside about
# 9 minutes (BUDGET seconds, default 530): every step runs under `timeout`, the later ones get what is left.
#
#   scripts/bench_serving_gpu.sh OUTDIR
#
# Then, with what the budget leaves, the steady state: one level of STEADY clients (default 64) sending 6 requests
# each, where a 2-request level spends a large share of its time reading everyone's first prompt at once and
# waiting for its last clients (BENCHMARKS.md run 42); STEADY=0 skips it.
#
# OUTDIR receives (9 files): gpu.txt (nvidia-smi), log.txt (every step's output), serving.md (the three tables,
# with their commands), serving.json and steady.json (per-level figures), server-serving.log,
# server-multiturn-reuse-on.log, server-multiturn-reuse-off.log and server-steady.log (the tritonserver logs).
#
# The machine has no network: the carried folder .gpus/ holds the wheels (nvidia-pytriton 0.7.0 with the
# tritonserver binary, numpy 1.26.4, openai-harmony, pydantic, ...) and vocab/o200k_base.tiktoken(.gz);
# scripts/make_serving_carry.sh builds it under the 64 MiB a carry may take. The wheels go into the image's own
# environment, not a --target folder: the Triton Python stub needs numpy<2 and ignores PYTHONPATH, so it finds
# kubrick through a .pth file. Afterwards that machine's transformers no longer imports (numpy 1.26): run
# bench_gpu.sh, whose peer needs it, on a fresh machine or before this script.
#
# Knobs (environment): KUBRICK_MAX_BATCH (default here 128, so the 128 level really batches 128),
# KUBRICK_STEP_TOKENS (default here 512, the engine default: it bounds the inter-token gap), KUBRICK_KV_CACHE_MEMORY (engine default unless set), CONCURRENCY
# (default 1,8,32,64,128), REQUESTS (per client, default 2), MAX_TOKENS (caps the mix's 128/256/512, default 512),
# TURNS (default 6), STEADY (default 64), CKPT (default /tmp/ck20; written once, reused when it exists), BUDGET
# (seconds, default 530),
# SERVER_CPUS (e.g. 0,1: the servers run on those CPUs only, a slow host on purpose; bench_serving.py --server-cpus),
# TEMPERATURE (default 0, greedy; 1 is kubrick's default, drawn on the GPU by kernels/sampling.py), TOP_P (default 1;
# below 1 each sampled step also finds every row's nucleus bound, kernels/nucleus.py).
# For a dry run on a CPU machine (an existing tiny checkpoint: a CKPT that does not exist gets a 14 GB 20b one):
# KUBRICK_MAX_BATCH=8 KUBRICK_STEP_TOKENS=64 PYTHON=.venv/bin/python INSTALL=0 DEVICE=cpu CKPT=<a tiny checkpoint>
# CONCURRENCY=1,2 REQUESTS=1 MAX_TOKENS=16 TURNS=2 scripts/bench_serving_gpu.sh /tmp/dry
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/bench_serving_gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${BUDGET:-530}
CKPT=${CKPT:-/tmp/ck20}
CONCURRENCY=${CONCURRENCY:-1,8,32,64,128}
REQUESTS=${REQUESTS:-2}
TURNS=${TURNS:-6}
STEADY=${STEADY:-64}
MAX_TOKENS=${MAX_TOKENS:-512}
TEMPERATURE=${TEMPERATURE:-0}
TOP_P=${TOP_P:-1}
DEVICE=${DEVICE:-cuda:0}
PYTHON=${PYTHON:-python3}
export KUBRICK_MAX_BATCH=${KUBRICK_MAX_BATCH:-128} KUBRICK_STEP_TOKENS=${KUBRICK_STEP_TOKENS:-512}
[ -n "${KUBRICK_KV_CACHE_MEMORY:-}" ] && export KUBRICK_KV_CACHE_MEMORY
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
left() { echo $((BUDGET - SECONDS)); }
# step NAME SECONDS COMMAND...: run under timeout (SIGTERM lets the bench scripts stop their server; SIGKILL
# 60 s later), output to the terminal and log.txt; then which processes still hold the GPU.
step() {
    local name=$1 limit=$2 rc
    shift 2
    if [ "$limit" -lt 20 ]; then
        echo "=== $name: skipped, only ${limit}s of the budget left" | tee -a "$LOG"
        return 1
    fi
    echo "=== $name (limit ${limit}s, $(date -u +%T), ${SECONDS}s in)" | tee -a "$LOG"
    timeout -k 60 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc ($(date -u +%T), ${SECONDS}s in); on the GPU now:" \
        "$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ' ')" | tee -a "$LOG"
    return "$rc"
}

nvidia-smi >"$OUT/gpu.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >>"$OUT/gpu.txt" 2>&1
if [ "${INSTALL:-1}" != 0 ] && ls .gpus/*.whl >/dev/null 2>&1; then
    step "install the carried wheels" 120 "$PYTHON" -m pip install --no-index --no-deps -q .gpus/*.whl
    site=$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])')
    echo "$PWD" >"$site/kubrick-src.pth"
fi
if [ -f .gpus/vocab/o200k_base.tiktoken.gz ] && [ ! -f .gpus/vocab/o200k_base.tiktoken ]; then
    gunzip -k .gpus/vocab/o200k_base.tiktoken.gz  # carried gzipped (scripts/make_serving_carry.sh)
fi
[ -f .gpus/vocab/o200k_base.tiktoken ] && export TIKTOKEN_ENCODINGS_BASE=$PWD/.gpus/vocab
"$PYTHON" -c 'import sys, torch, numpy, kubrick; print("python", sys.version.split()[0], "torch", torch.__version__,
    "numpy", numpy.__version__, "kubrick from", kubrick.__file__)' 2>&1 | tee -a "$LOG"
# The code that ran, by content: a copied tree's .git can be older than its files (the GPU machine's copy is).
echo "source $(scripts/source_fingerprint) (scripts/source_fingerprint); KUBRICK_MAX_BATCH=$KUBRICK_MAX_BATCH" \
    "KUBRICK_STEP_TOKENS=$KUBRICK_STEP_TOKENS KUBRICK_KV_CACHE_MEMORY=${KUBRICK_KV_CACHE_MEMORY:-default}" \
    "CONCURRENCY=$CONCURRENCY DEVICE=$DEVICE TEMPERATURE=$TEMPERATURE TOP_P=$TOP_P" | tee -a "$LOG"

if [ -d "$CKPT" ]; then
    echo "=== checkpoint $CKPT exists; reused" | tee -a "$LOG"
else
    step "random gpt-oss-20b checkpoint" 150 "$PYTHON" -m kubrick.cli make-checkpoint "$CKPT" --preset 20b
fi

# The multi-turn run needs two server starts and 12 short requests: keep 180 s for it (and 60 s for the steady
# state, which takes what the others leave, unless that would starve the levels: then it is skipped).
serving=$(($(left) - 180))
if [ "$STEADY" != 0 ]; then
    if [ "$serving" -ge 210 ]; then
        serving=$((serving - 60))
    else
        echo "=== the steady state skipped: only ${serving}s of the budget for the levels" | tee -a "$LOG"
        STEADY=0
    fi
fi
[ "$serving" -gt 300 ] && serving=300
pin=()
[ -n "${SERVER_CPUS:-}" ] && pin=(--server-cpus "$SERVER_CPUS")
step "serving, concurrency $CONCURRENCY" "$serving" "$PYTHON" scripts/bench_serving.py --checkpoint "$CKPT" \
    --device "$DEVICE" --context-length 4096 --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
    --max-tokens "$MAX_TOKENS" --temperature "$TEMPERATURE" --top-p "$TOP_P" "${pin[@]}" \
    --record "$OUT/serving.md" --json "$OUT/serving.json" --server-log "$OUT/server-serving.log"

step "multi-turn, prefix reuse on then off" "$(($(left) - (STEADY == 0 ? 10 : 70)))" "$PYTHON" scripts/bench_multiturn.py \
    --checkpoint "$CKPT" --device "$DEVICE" --context-length 4096 --turns "$TURNS" "${pin[@]}" \
    --record "$OUT/serving.md" --server-log "$OUT/server-multiturn.log"

if [ "$STEADY" != 0 ]; then
    step "steady state, $STEADY clients of 6 requests" "$(($(left) - 5))" "$PYTHON" scripts/bench_serving.py \
        --checkpoint "$CKPT" --device "$DEVICE" --context-length 4096 --concurrency "$STEADY" --requests 6 \
        --max-tokens "$MAX_TOKENS" --temperature "$TEMPERATURE" --top-p "$TOP_P" "${pin[@]}" \
        --record "$OUT/serving.md" --json "$OUT/steady.json" --server-log "$OUT/server-steady.log"
fi

echo "=== done ($(date -u +%T), ${SECONDS}s)" | tee -a "$LOG"
