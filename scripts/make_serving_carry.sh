#!/usr/bin/env bash
# Build .gpus/, what scripts/bench_serving_gpu.sh needs on the GPU machine (Python 3.12, no network), small
# enough to carry (the device tool takes 64 MiB in all, the working tree included):
#   - the wheels the machine lacks: nvidia-pytriton 0.7.0 (the tritonserver binary), numpy 1.26.4 (the Triton
#     Python stub fails under numpy 2), httpx-sse, openai-harmony and pydantic's stack;
#   - nvidia-pytriton slimmed to the Python 3.12 stub: the stubs of 3.8-3.11 and 3.13 and the libpython 3.13
#     they bring go (73 -> 58 MB of wheels); the 3.12 stub links the machine's own libpython3.12;
#   - vocab/o200k_base.tiktoken.gz (bench_serving_gpu.sh unpacks it there), from `kubrick.engine.vocab install`.
#
#   scripts/make_serving_carry.sh [OUTDIR]      (default .gpus; about 65 MB, a minute with a warm pip cache)
#
# Then: run(command="CKPT=/tmp/ck20 scripts/bench_serving_gpu.sh $OUT/s", carry=[".gpus"]). Nothing else fits
# beside it (carry .gpu/ in another call), and the wheels go into the machine's own environment: a later
# transformers import on that machine fails under numpy 1.26, so run bench_gpu.sh's peers before serving.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpus}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT/vocab"
OUT=$(cd "$OUT" && pwd)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$OUT" nvidia-pytriton==0.7.0 numpy==1.26.4 httpx-sse openai-harmony \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection
wheel=$(ls "$OUT"/nvidia_pytriton-0.7.0-*.whl)
if unzip -l "$wheel" | grep "python_backend_stubs/3.13/" >/dev/null; then  # (no -q: unzip would get SIGPIPE)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    unzip -q "$wheel" -d "$work"
    rm -rf "$work"/pytriton/tritonserver/python_backend_stubs/{3.8,3.9,3.10,3.11,3.13} "$work"/nvidia_pytriton.libs/libpython3-*
    record=$(ls -d "$work"/*.dist-info)/RECORD
    grep -v -E "python_backend_stubs/3\.(8|9|10|11|13)/|nvidia_pytriton.libs/libpython3-" "$record" >"$work/RECORD" || true
    mv "$work/RECORD" "$record"
    rm "$wheel"
    (cd "$work" && zip -q -r -9 "$wheel" .)
fi
if [ ! -f "$OUT/vocab/o200k_base.tiktoken.gz" ]; then
    "$PYTHON" -m kubrick.engine.vocab install "$OUT/vocab"
    gzip -9 -f "$OUT/vocab/o200k_base.tiktoken"
fi
du -sh "$OUT"
