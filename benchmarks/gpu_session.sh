#!/usr/bin/env bash
# A GPU session's work in as few commands as possible: build fastlora._C for the GPU at hand, run
# the whole test suite on it, benchmark the anchor shapes (Llama-3-8B, bf16, r=16) side by side and
# print the summary last. Usage: `bash benchmarks/gpu_session.sh [build] [tests] [bench]` (default:
# all three, about 12 minutes; the device tool allows 10 a call, so split them, e.g. `build tests`
# then `bench`: the built extension stays in the tree while the machine is warm). Results and logs
# go to $OUT, else benchmarks/results/gpu-<date>/. A failed step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu-$(date -u +%F)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}
steps=${*:-build tests bench}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$python" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
} | tee "$out/env.txt"

# The GPU machine has no network: wheels it needs (nvidia-cutlass for the build, bitsandbytes for
# the QLoRA tests and providers) travel in .wheels/ (ignored by git; `pip download --no-deps -d
# .wheels nvidia-cutlass==4.2.0.0 bitsandbytes==0.50.2` here, then carry it) and install from there.
if [[ -d .wheels ]]; then
  "$python" -m pip install --no-index --no-deps --find-links .wheels .wheels/*.whl >"$out/wheels.log" 2>&1 \
    && echo "wheels: installed from .wheels/" || echo "wheels: FAILED, see wheels.log"
fi

if [[ " $steps " == *" build "* ]]; then
  # sm_90 gets the arch-specific 90a target (wgmma/TMA-capable); others their own capability.
  capability=$("$python" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
  archs=$([[ $capability == 90 ]] && echo 90a || echo "$capability")
  if FASTLORA_CUDA_ARCHS=$archs MAX_JOBS=16 timeout 240 "$python" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
    echo "build: ok (sm_$archs)"
  else
    echo "build: FAILED, see build.log"
  fi
fi

if [[ " $steps " == *" tests "* ]]; then
  timeout 330 "$python" -m pytest -q -p no:cacheprovider tests >"$out/tests.log" 2>&1
  echo "tests: $(tail -n 1 "$out/tests.log")"
fi

if [[ " $steps " == *" bench "* ]]; then
  timeout 540 "$python" -m fastlora bench --device cuda --shapes llama3-8b --tokens 1024,8192 \
    --decode-tokens 1,64 --ranks 16 --dtypes bf16 --modes forward,train,decode \
    --providers base,naive,peft-fp32,peft,addmm,fastlora-triton,fastlora-cuda,fastlora-torch,fastlora-auto,peft-qlora,fastlora-qlora \
    --json "$out/bench.json" --csv "$out/bench.csv" --markdown "$out/bench.md" --plot "$out/bench.png" \
    >"$out/bench.stdout" 2>"$out/bench.stderr"
  echo "bench: exit $?"
  sed -n '/### summary: time ÷ base/,/### summary: time ÷ naive/p' "$out/bench.md"
fi
