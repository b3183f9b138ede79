#!/bin/bash
# The decode graphs under other block-table entries (in the graph, where PDL overlaps the launches, which the
# standalone sweeps of bench_kernels.py do not see): `python3 scripts/bench_decode.py` with the table as it is and
# with each override, alternated twice in one call, on a GPU. An override is KERNEL='{"KEY": value, ...}', merged
# into that kernel's sm90 entry (nested dicts such as MLP2 replace the entry's whole MLP2).
#
#   bash scripts/experiments/table_decode_ab.sh 'moe_gemv={"MLP2": {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 8}}'
set -u
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: table_decode_ab.sh KERNEL='{json}' [...]" >&2; exit 2; }
run() {  # $1: label, $2: override or empty
    OVERRIDE="$2" python3 -c "
import os, sys
sys.argv = ['bench_decode', '--label', sys.argv[1]]
sys.path.insert(0, 'scripts')
import bench_decode
if os.environ['OVERRIDE']:
    bench_decode.override_table(os.environ['OVERRIDE'])
sys.exit(bench_decode.main())
" "$1" 2>&1 | tail -1
}
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
for round in 1 2; do
    run table ""
    for override in "$@"; do run "$override" "$override"; done
done
date -u
