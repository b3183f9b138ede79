#!/usr/bin/env bash
# One GPU session's worth of measurement, in one go (device time is scarce): our kernels, the kernel engine
# (scripts/bench_engine.py --impl triton), the peers (tritonllm, transformers), the GPU tests at real shapes
# and, with WITH_REFERENCE=1, the reference engine. About 6-8 minutes on one H100.
#
#   scripts/bench_gpu.sh OUTDIR [PEERS_DIR]
#
# PEERS_DIR holds bench_tritonllm.py and bench_transformers.py (shared/peers/ in the workplace); wheels the GPU
# machine lacks (tritonllm, termcolor, openai-harmony, pydantic …) are installed from .gpu/ (carried) when it
# exists, and .gpu/vocab/o200k_base.tiktoken (`python -m kubrick.engine.vocab install .gpu/vocab`) serves the
# Engine tests. A random 20b checkpoint is written once (CKPT, default /tmp/kubrick-ck20b) and shared by the
# engine bench and the GPU tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/bench_gpu.sh OUTDIR [PEERS_DIR]}
PEERS=${2:-}
CKPT=${CKPT:-/tmp/kubrick-ck20b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .gpu/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -f .gpu/vocab/o200k_base.tiktoken ] && export TIKTOKEN_ENCODINGS_BASE=$PWD/.gpu/vocab
export KUBRICK_TEST_CHECKPOINT_20B=$CKPT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
echo "source $(scripts/source_fingerprint) (scripts/source_fingerprint: the code that ran, by content)" | tee -a "$OUT/gpu.txt"
step() { echo "=== $1 ($(date -u +%T))" | tee -a "$OUT/log.txt"; shift; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
step "kernel engine, 20b shape (bench_engine --impl triton)" timeout 240 python3 scripts/bench_engine.py --preset 20b \
    --device cuda --impl triton --checkpoint "$CKPT" --decode-tokens 64 --json "$OUT/bench_engine_triton.json"
# KERNEL_SWEEPS: sweep flags of bench_kernels.py to add, e.g. "--sweep-tables" (each adds up to a minute)
step "kernels" timeout 150 python3 scripts/bench_kernels.py ${KERNEL_SWEEPS:-} --json "$OUT/bench_kernels.json"
if [ -n "$PEERS" ]; then
    step "peer: tritonllm 0.1.1" timeout 130 python3 "$PEERS/bench_tritonllm.py"
    step "peer: transformers" timeout 130 python3 "$PEERS/bench_transformers.py"
fi
step "GPU tests (kernels, engine)" timeout 200 python3 -m pytest -q -s -m gpu tests/kernels tests/engine -p no:cacheprovider
if [ -n "${WITH_REFERENCE:-}" ]; then
    step "reference engine, 20b shape" timeout 200 python3 scripts/bench_engine.py --preset 20b --device cuda \
        --impl reference --checkpoint "$CKPT" --json "$OUT/bench_engine_reference.json"
fi
echo "=== done ($(date -u +%T))"
