#!/usr/bin/env bash
# One GPU session's worth of measurement, in one go (device time is scarce): the GPU tests at real shapes, our
# kernels and kernel engine, the peers (tritonllm, transformers) and, with WITH_REFERENCE=1, the reference engine.
#
#   scripts/bench_gpu.sh OUTDIR [PEERS_DIR]
#
# PEERS_DIR holds bench_tritonllm.py and bench_transformers.py (shared/peers/ in the workplace); wheels the GPU
# machine lacks (tritonllm, termcolor, openai-harmony, pydantic …) are installed from .gpu/ (carried) when it exists.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/bench_gpu.sh OUTDIR [PEERS_DIR]}
PEERS=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .gpu/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
step() { echo "=== $1"; shift; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
step "kernels + kernel engine" timeout 230 python3 scripts/bench_kernels.py --model --json "$OUT/bench_kernels.json"
if [ -n "$PEERS" ]; then
    step "peer: tritonllm 0.1.1" timeout 130 python3 "$PEERS/bench_tritonllm.py"
    step "peer: transformers" timeout 130 python3 "$PEERS/bench_transformers.py"
fi
step "GPU tests (kernels, engine)" timeout 100 python3 -m pytest -q -m gpu tests/kernels tests/engine -p no:cacheprovider
if [ -n "${WITH_REFERENCE:-}" ]; then
    step "reference engine, 20b shape" timeout 200 python3 scripts/bench_engine.py --preset 20b --device cuda --json "$OUT/bench_engine.json"
fi
echo "=== done"
