#!/usr/bin/env bash
# Regenerate the committed inspect tables: every Triton kernel × config its autotuner can pick, on the
# anchor problems (4096², M 64 and 8192, r 16, bf16 and bf16 with fp32 adapters, dropout 0 and 0.1),
# compiled for sm_90a and sm_80 (benchmarks/results/inspect-sm90a-sm80.md) and for sm_100a and sm_120
# (inspect-sm100a-sm120.md), and every kernel of fastlora._C if it is built (bash .ci/build_cuda.sh).
# No GPU needed. About 12 minutes a table on the 2-core machine with nothing else running (482 and
# 521 compiles, 2026-12-02); the inspect defaults (48 problems an arch) take over an hour there.
# Exits non-zero as inspect does (a compile error or a pickable config that spills), after writing.
#   PYTHON  interpreter whose environment holds torch and triton (default: python3)
#   extra arguments go to both `fastlora inspect` runs (e.g. --workers 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
problems=(--shapes 4096x4096 --tokens 64,8192 --ranks 16 --dtypes bf16,bf16+fp32 --dropout 0,0.1)
status=0
for archs in 90a,80 100a,120; do
  table=benchmarks/results/inspect-sm${archs/,/-sm}.md
  env -u TRITON_INTERPRET "$PYTHON" -m fastlora inspect --arch "$archs" "${problems[@]}" --markdown "$table" "$@" >/dev/null || status=$?
  echo "inspect_table.sh: wrote $table"
done
exit $status
