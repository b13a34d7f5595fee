#!/usr/bin/env bash
# Regenerate benchmarks/results/inspect-sm90a-sm80.md: every Triton kernel × config its autotuner can
# pick on the default problems, compiled for sm_90a and sm_80, and every kernel of fastlora._C if it is
# built (bash .ci/build_cuda.sh). No GPU needed; minutes on a small machine. Extra arguments go to
# `fastlora inspect` (e.g. --json r.json --cubin-dir cubins). Exits non-zero as inspect does (a compile
# error or a pickable config that spills), after writing the table.
#   PYTHON  interpreter whose environment holds torch and triton (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
env -u TRITON_INTERPRET "$PYTHON" -m fastlora inspect --arch 90a,80 --markdown benchmarks/results/inspect-sm90a-sm80.md "$@" >/dev/null
echo "inspect_table.sh: wrote benchmarks/results/inspect-sm90a-sm80.md"
