#!/bin/bash
# norm_router's programs a row at one token, in the decode graphs (bench_kernels.py --sweep-router times the kernel
# alone, where PDL's overlap does not show): `python3 scripts/bench_decode.py` with default_splits as it is and
# forced to each count given at one token, alternated twice in one call, on a GPU. Counts are powers of two (the
# last program's merge spans them with one arange). 16 programs of 2880 values make each slice one 256-value step,
# which the kernel loads before its PDL wait (8, the default, take 3 steps of 128). Results: BENCHMARKS.md run 48.
#
#   bash scripts/experiments/router_splits_ab.sh 4 16
set -u
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: router_splits_ab.sh SPLITS [...]" >&2; exit 2; }
run() {  # $1: splits at one token, 0 for the default
    SPLITS="$1" python3 -c "
import os, sys
sys.path.insert(0, 'scripts')
from kubrick.engine.kernels import router
forced = int(os.environ['SPLITS'])
sys.argv = ['bench_decode', '--label', f'splits {forced}' if forced else 'default']
if forced:
    default = router.default_splits
    router.default_splits = lambda tokens, hidden, block_k, sms: forced if tokens == 1 else default(tokens, hidden, block_k, sms)
import bench_decode
sys.exit(bench_decode.main())
" 2>&1 | tail -1
}
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
for round in 1 2; do
    run 0
    for splits in "$@"; do run "$splits"; done
done
date -u
