#!/usr/bin/env bash
# A GPU session in two commands that fit 13 minutes of GPU time, a fresh machine's start included
# (a GPU run here gets 15 minutes, at most 10 a command):
#
#   bash benchmarks/gpu_session.sh first    # build fastlora._C (forced: fails loudly), then doctor
#   bash benchmarks/gpu_session.sh second   # the anchor benchmark, then the GPU tests
#
# Budget: every step runs under an explicit `timeout`, and the limits add up to
#   first:  env 15 + wheels 20 + build 170 + doctor 180       = 385 s (6 min 25 s)
#   second: env 15 + wheels 20 + bench 110 + tests 190        = 335 s (5 min 35 s)
#   total 720 s of limits, plus a fresh machine's start (about a minute): 13 minutes of the 15. Each
#   command is under 8 minutes. (tests had 130 s until 2026-12-03: the pre-bound replay tests make
#   more calls each, and the step's limit cuts every test after it.)
# The built extension stays in the tree while the machine is warm; if the second command lands on a
# fresh machine (the first's was given back), run `first` again or expect backend 'cuda' unavailable.
#
# Every step prints one line: "<step>: ok in Ns", "<step>: FAILED (...) in Ns" or "<step>: TIMED OUT
# after Ns", then the part of its log worth reading. Results and logs go to $OUT, else
# benchmarks/results/gpu-<date>/. A failed step does not stop the next.
#
# What `doctor` prints (verdict per backend, time table at M=8192 K=N=4096 r=16 bf16) is the
# correctness gate of the session; the bench writes each case to bench.json/.csv/.md as it
# finishes, so a timeout keeps the finished cases; the tests run `-m "gpu and not slow"` with a
# per-test timeout (pytest-timeout, on the GPU image) and -v, so a test that hangs is named (the
# last "tests/...::test_x" line of tests.log without a result).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu-$(date -u +%F)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}
part=${1:-}
if [[ $part != first && $part != second ]]; then
  echo "usage: bash benchmarks/gpu_session.sh first|second" >&2
  exit 2
fi

# step NAME SECONDS LOG COMMAND...: run COMMAND under `timeout SECONDS`, its output in LOG; one line
# saying how it ended and how long it took. Returns the command's status.
step() {
  local name=$1 limit=$2 log=$3 start status
  shift 3
  start=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
  status=$?
  local took=$(($(date +%s) - start))
  if [[ $status == 0 ]]; then
    echo "$name: ok in ${took}s"
  elif [[ $status == 124 || $status == 137 ]]; then
    echo "$name: TIMED OUT after ${took}s (limit ${limit}s), see $log"
  else
    echo "$name: FAILED (exit $status) in ${took}s, see $log"
  fi
  return $status
}

step env 15 "$out/env-$part.txt" bash -c "date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
  $python -c \"import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)\""
cat "$out/env-$part.txt"

# The GPU machine has no network: wheels it needs (nvidia-cutlass for the build, bitsandbytes for
# the QLoRA tests and providers) travel in .wheels/ (ignored by git; `pip download --no-deps -d
# .wheels nvidia-cutlass==4.2.0.0 bitsandbytes==0.50.2` here, then carry it) and install from there.
if [[ -d .wheels ]]; then
  step wheels 20 "$out/wheels-$part.log" "$python" -m pip install --no-index --no-deps --find-links .wheels .wheels/*.whl
fi

if [[ $part == first ]]; then
  # sm_90 gets the arch-specific 90a target (wgmma/TMA-capable); others their own capability. Forced,
  # so that a missing toolkit, missing CUTLASS headers or a compile error fails the step.
  capability=$("$python" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
  archs=$([[ $capability == 90 ]] && echo 90a || echo "$capability")
  echo "build: sm_$archs, MAX_JOBS=16"
  if ! step build 170 "$out/build.log" env FASTLORA_FORCE_CUDA_BUILD=1 FASTLORA_CUDA_ARCHS="$archs" MAX_JOBS=16 \
    "$python" setup.py build_ext --inplace; then
    tail -n 25 "$out/build.log"
  fi

  # Each backend's check in its own child process, 50 s each (typically: torch and cuda ~5 s, triton and
  # triton-4bit mostly compiling, the time table ~30 s). At worst 250 s: the step's 180 s then cuts
  # the table or the last backend, whose finished problems are already in the log, one line each.
  step doctor 180 "$out/doctor.log" "$python" -m fastlora doctor --timeout 50
  cat "$out/doctor.log"
else
  # The anchor: Llama-3-8B's q/o and gate/up projections, bf16, r=16; prefill/train at 8192 tokens
  # and decode at 1. Each case is written as it finishes.
  step bench 110 "$out/bench.stdout" "$python" -m fastlora bench --device cuda --shapes 4096x4096,4096x14336 \
    --tokens 8192 --decode-tokens 1 --ranks 16 --dtypes bf16 --modes forward,train,decode \
    --providers base,naive,peft,addmm,fastlora-triton,fastlora-cuda,fastlora-torch,fastlora-auto,peft-qlora,fastlora-qlora \
    --json "$out/bench.json" --csv "$out/bench.csv" --markdown "$out/bench.md"
  [[ -f $out/bench.md ]] && sed -n '/### summary: time ÷ base/,/### summary: time ÷ naive/p' "$out/bench.md"
  grep -h "Partial run" "$out/bench.md" 2>/dev/null

  # The GPU tests that are not slow, 60 s each at most (pytest-timeout); -v names each test as it
  # starts, so one that hangs in a kernel (where pytest-timeout's signal cannot reach) is the log's
  # last line when the step's own timeout kills the run.
  step tests 190 "$out/tests.log" "$python" -m pytest -p no:cacheprovider -m "gpu and not slow" --timeout 60 -rA -v tests
  status=$?
  sed -n '/short test summary info/,$p' "$out/tests.log" | grep -v "^PASSED" | tail -n 40
  grep -n "Timeout" "$out/tests.log" | head -n 10
  if [[ $status == 124 || $status == 137 ]]; then
    echo "tests: the last test started: $(grep -E '^tests/.*::' "$out/tests.log" | tail -n 1)"
  fi
fi
