"""Loading the compiled CUDA extension ``fastlora._C`` (sources in ``csrc/``).

``load_extension()`` imports the prebuilt ``fastlora._C`` (built by ``setup.py``); importing it runs
its ``TORCH_LIBRARY_IMPL`` registration of the CUDA kernels of ``fastlora::cuda_forward`` /
``fastlora::cuda_backward``, which ``cuda_lora`` defines from the shared schemas.
Without a prebuilt module, and only if ``FASTLORA_JIT_BUILD=1``, it compiles ``csrc/`` in place with
``torch.utils.cpp_extension.load`` (needs the CUDA toolkit and a source checkout; minutes).

It never raises: it returns None once the ops are registered, else one sentence saying why not and
how to fix it. A module that is simply not built is the normal case of a pure-Python install and
stays silent; a build that exists but fails to load (say, compiled against another torch) or a JIT
build that fails is also reported by one warning.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from pathlib import Path

_MODULE = "fastlora._C"
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_REBUILD = (
    "reinstall with `FASTLORA_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e .` on a machine with "
    "the CUDA toolkit, or set FASTLORA_JIT_BUILD=1"
)


def _import_prebuilt() -> tuple[str | None, bool]:
    """(None, False) once imported; else (why not, whether a build exists but failed to load)."""
    if importlib.util.find_spec(_MODULE) is None:
        return f"{_MODULE} is not built: {_REBUILD}", False
    try:
        importlib.import_module(_MODULE)
    except (ImportError, OSError) as err:
        reason = f"{_MODULE} exists but failed to load ({err}); it was likely built against another torch"
        return f"{reason}: {_REBUILD}", True
    return None, False


def _cutlass_include_dirs() -> list[str] | str:
    """The CUTLASS/CuTe header directories (CUTLASS_PATH, else the nvidia-cutlass package), or why not."""
    if os.environ.get("CUTLASS_PATH"):
        root = Path(os.environ["CUTLASS_PATH"])
    else:
        spec = importlib.util.find_spec("cutlass_library")  # located, not imported (its import is heavy)
        if spec is None or not spec.submodule_search_locations:
            return "the CUTLASS headers are missing (pip install nvidia-cutlass==4.2.0.0, or set CUTLASS_PATH)"
        root = Path(next(iter(spec.submodule_search_locations))) / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    if not (dirs[0] / "cute" / "tensor.hpp").is_file():
        return f"the CUTLASS headers are missing: no {dirs[0] / 'cute' / 'tensor.hpp'}"
    return [str(d) for d in dirs]


def _jit_build() -> str | None:
    sources = sorted(str(p) for p in (*_CSRC.glob("*.cpp"), *_CSRC.glob("*.cu")))
    if not sources:
        return f"FASTLORA_JIT_BUILD=1 but the CUDA sources are not in {_CSRC} (they ship with a source checkout only)"
    include_dirs = _cutlass_include_dirs()
    if isinstance(include_dirs, str):
        return f"FASTLORA_JIT_BUILD=1 but {include_dirs}"
    try:
        import torch
        from torch.utils.cpp_extension import load

        # Targets come from TORCH_CUDA_ARCH_LIST, else the visible GPUs; the kernels need sm_80 or newer.
        # On an H100 the Hopper kernels are added (sm_90a is not in torch's default target list).
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
        defines = ["-DFASTLORA_CUTLASS"] + (["-DFASTLORA_SM90A"] if hopper else [])
        cutlass_flags = ["-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG"] + [
            f"-U__CUDA_NO_{what}__"
            for what in ("HALF_OPERATORS", "HALF_CONVERSIONS", "HALF2_OPERATORS", "BFLOAT16_OPERATORS", "BFLOAT16_CONVERSIONS")
        ]
        gencode = ["-gencode=arch=compute_90a,code=sm_90a"] if hopper else []
        load(
            name="fastlora_C",
            sources=sources,
            extra_cflags=["-O3", *defines],
            extra_cuda_cflags=["-O3", "-lineinfo", *defines, *cutlass_flags, *gencode],
            extra_include_paths=include_dirs,
            is_python_module=False,
        )
    except Exception as err:  # compiler, toolkit and loader failures surface as many exception types
        return f"FASTLORA_JIT_BUILD=1 but compiling {_CSRC} failed ({type(err).__name__}: {err})"
    return None


@functools.cache
def load_extension() -> str | None:
    """None once the kernels of ``fastlora::cuda_forward`` / ``cuda_backward`` are registered, else why not."""
    reason, failed = _import_prebuilt()
    if reason is not None and os.environ.get("FASTLORA_JIT_BUILD") == "1":
        jit_reason = _jit_build()
        if jit_reason is None:
            return None
        reason, failed = (f"{reason}; {jit_reason}" if failed else jit_reason), True
    if failed:
        warnings.warn(f"fastlora: the CUDA backend is unavailable: {reason}", RuntimeWarning, stacklevel=2)
    return reason
