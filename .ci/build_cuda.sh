#!/usr/bin/env bash
# Compile the CUDA extension fastlora._C (csrc/) on a machine without a GPU: needs a CUDA build of
# torch in $PYTHON's environment and the CUDA toolkit; installs the CUTLASS headers (the
# nvidia-cutlass pin of pyproject.toml) unless CUTLASS_PATH is set; fails on any compile error or a
# missing .so.
#   PYTHON               interpreter whose environment holds torch (default: python3)
#   FASTLORA_CUDA_ARCHS  GPU targets (default: "80;90a")
#   MAX_JOBS             parallel compile jobs (default: 2)
#   CCACHE_DISABLE=1     do not use ccache even where it is installed
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# The toolkit root: $CUDA_HOME if set, else the usual install paths, else nvcc's real location.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for candidate in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [[ -x "$candidate/bin/nvcc" ]]; then
      CUDA_HOME=$candidate
      break
    fi
  done
fi
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
if [[ -z "${CUDA_HOME:-}" || ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "build_cuda.sh: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 1
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"

# torch's CUDA wheels ship headers (cuda_runtime.h, cusparse.h, ...) under nvidia/cu13/include that
# its own headers include; the toolkit may lack some of them.
pip_include=$("$PYTHON" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
roots = spec.submodule_search_locations if spec else []
print(next((str(p) for r in roots for p in [pathlib.Path(r, "cu13", "include")] if p.is_dir()), ""))')
if [[ -n "$pip_include" ]]; then
  export CPATH="$pip_include${CPATH:+:$CPATH}"
fi

# The build is not isolated (it must see this environment's torch), so its CUTLASS requirement is
# installed here, at the version pyproject.toml pins.
if [[ -z "${CUTLASS_PATH:-}" ]]; then
  cutlass_pin=$(grep -o '"nvidia-cutlass==[^"]*"' pyproject.toml | tr -d '"')
  if [[ -z "$cutlass_pin" ]]; then
    echo "build_cuda.sh: pyproject.toml pins no nvidia-cutlass==VERSION" >&2
    exit 1
  fi
  "$PYTHON" -m pip install -q "$cutlass_pin"
fi

# ccache, where installed (apt-get install ccache), caches every object: torch's extension builder
# puts it in front of the host compiler and nvcc by itself (unless PYTORCH_NVCC is set). pip's
# editable build compiles in a new temporary directory each time, so the key must not hold it
# (NOHASHDIR; BASEDIR makes the paths relative): a checkout at the same path hits what an earlier
# build stored (measured: the four CUTLASS files, ~250 s of the build's CPU, all hit).
if command -v ccache >/dev/null && [[ -z "${CCACHE_DISABLE:-}" ]]; then
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD} CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-true}
  ccache --zero-stats >/dev/null
  use_ccache=1
fi

export FASTLORA_FORCE_CUDA_BUILD=1
export FASTLORA_CUDA_ARCHS=${FASTLORA_CUDA_ARCHS:-80;90a}
export MAX_JOBS=${MAX_JOBS:-2}
echo "build_cuda.sh: CUDA_HOME=$CUDA_HOME archs=$FASTLORA_CUDA_ARCHS MAX_JOBS=$MAX_JOBS CPATH=${CPATH:-}"

start=$SECONDS
"$PYTHON" -m pip install --no-build-isolation --no-deps -e .
echo "build_cuda.sh: built in $((SECONDS - start)) s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
if [[ -n "${use_ccache:-}" ]]; then
  echo "build_cuda.sh: ccache: $(ccache --print-stats 2>/dev/null | grep -E '^(direct_cache_hit|preprocessed_cache_hit|cache_miss)' | tr '\t\n' '= ')"
fi

shopt -s nullglob
built=(fastlora/_C*.so)
if (( ${#built[@]} == 0 )); then
  echo "build_cuda.sh: fastlora/_C*.so was not produced" >&2
  exit 1
fi
echo "build_cuda.sh: ok: ${built[*]}"
