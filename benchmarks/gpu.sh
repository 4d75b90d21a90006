#!/usr/bin/env bash
# One GPU session, end to end (issue 22): install our wheels, the GPU tests, the benchmark matrix.
# Results land in $RESULTS (default benchmarks/results/): gpu_tests.txt, gpu_matrix.md, gpu_matrix.csv,
# peer.csv, memory.csv.
#
#   PEER=1 bash ../shared/device/wheels.sh       # here, once: our wheels (and the peer's) into .whl/
#   bash benchmarks/gpu.sh                       # on the GPU machine, from the project root (~8 min)
#   TINY=1 bash benchmarks/gpu.sh                # the rehearsal on a CPU, tiny sizes (no install, no GPU tests)
#   FROM=5 SKIP_TESTS=1 bash benchmarks/gpu.sh   # a second session: the matrix from its row 5 on
#
# BUDGET_S (default 480) bounds the whole script: the matrix gets what install and tests leave, and
# runs its rows in order of importance (benchmarks/matrix.py).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
TINY=${TINY:-0}
BUDGET_S=${BUDGET_S:-480}
FROM=${FROM:-0}
SKIP_TESTS=${SKIP_TESTS:-$TINY}
out=${RESULTS:-benchmarks/results}
mkdir -p "$out"
start=$SECONDS

if [ "$TINY" = 0 ] && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
fi
if [ -d .whl/peer ] && [ ! -d .peer ]; then
    # not fatal: without the peer, its row fails and says why, and every other row runs
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target .peer .whl/peer/*.whl ||
        { rm -rf .peer; echo "gpu.sh: the peer's wheels did not install; its row will fail"; }
fi
echo "gpu.sh: installed in $((SECONDS - start)) s"

if [ "$SKIP_TESTS" = 0 ]; then
    # the GPU tests: under 3 minutes together (tests/test_gpu.py). -k: the trainer takes every SIGTERM as
    # "save and stop at the next step", which a step stuck in compilation never reaches. no:logging: pytest's
    # log capture turns on torch's DEBUG trace records, whose payloads (graphs, generated code) cost compile time
    timeout -k 15 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider -p no:logging tests/test_gpu.py > "$out/gpu_tests.txt" 2>&1
    tail -25 "$out/gpu_tests.txt"
    echo "gpu.sh: GPU tests done at $((SECONDS - start)) s"
fi

matrix=(-m benchmarks.matrix --budget-s $((BUDGET_S - (SECONDS - start))) --peer-dir .peer --out "$out" --from "$FROM")
[ "$TINY" = 1 ] && matrix+=(--tiny)
"$PY" "${matrix[@]}"
echo "gpu.sh: done in $((SECONDS - start)) s"
