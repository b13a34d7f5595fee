"""Build and install fastlora; torch must already be installed (``pip install --no-build-isolation``).

The package is pure Python plus an optional CUDA extension, ``fastlora._C`` (``csrc/``), which backs
``backend="cuda"``. The extension is built when torch sees a GPU, or when forced; without torch, a
CUDA build of torch or the CUDA toolkit, setup warns and installs the pure-Python package.

Environment flags:
    FASTLORA_FORCE_CUDA_BUILD=1  build the extension even without a visible GPU (e.g. on a CPU build
                                 machine with the toolkit); a compile error then fails the install.
    FASTLORA_SKIP_CUDA_BUILD=1   never build it.
    FASTLORA_CUDA_ARCHS          ';'-separated targets, default "80;90a" (A100, H100). The kernels
                                 need sm_80 or newer. Non-"a" targets also embed PTX for newer GPUs.
    CUDA_HOME                    the toolkit root, if nvcc is not on PATH.
    MAX_JOBS                     parallel compile jobs (ninja).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"


def read_version() -> str:
    text = (ROOT / "fastlora" / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("fastlora/__init__.py defines no __version__")
    return match.group(1)


def gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for "80;90a"-style targets: SASS for each, plus PTX for portable ones."""
    flags = []
    for arch in filter(None, (a.strip().replace(".", "") for a in archs.split(";"))):
        if not re.fullmatch(r"\d+[af]?", arch):
            raise ValueError(f"FASTLORA_CUDA_ARCHS: {arch!r} is not a compute capability like 80 or 90a")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        # Arch-specific ("a"/"f") code runs on its own chip family only; portable PTX lets newer GPUs JIT.
        if arch[-1] not in "af":
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for fastlora._C, or ([], {}) with the reason given as a warning."""

    def skip(reason: str) -> tuple[list, dict]:
        warnings.warn(f"fastlora: building without the CUDA extension ({reason}); backend='cuda' will be unavailable")
        return [], {}

    if os.environ.get("FASTLORA_SKIP_CUDA_BUILD") == "1":
        return [], {}
    forced = os.environ.get("FASTLORA_FORCE_CUDA_BUILD") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        return skip(f"torch is not importable: {err}; install torch first and use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if not (forced or torch.cuda.is_available()):
        return skip("no GPU is visible; set FASTLORA_FORCE_CUDA_BUILD=1 to build anyway")
    if CUDA_HOME is None:
        return skip("no CUDA toolkit found; set CUDA_HOME or put nvcc on PATH")

    class BuildExt(BuildExtension):
        """Unless forced, a failed compile degrades to a pure-Python install instead of failing it."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:
                if forced:
                    raise
                warnings.warn(f"fastlora: compiling {ext.name} failed ({err}); backend='cuda' will be unavailable")

    # No --use_fast_math: it flushes fp32 denormals and changes rounding, which the fp32 path's 1e-5
    # accuracy and the reference semantics do not allow; the kernels gain little from it anyway.
    nvcc_flags = ["-O3", "-lineinfo", *gencode_flags(os.environ.get("FASTLORA_CUDA_ARCHS", DEFAULT_ARCHS))]
    extension = CUDAExtension(
        name="fastlora._C",
        sources=["csrc/lora_ops.cpp", "csrc/lora_kernels.cu"],
        depends=["csrc/lora_kernels.cuh"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [extension], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="fastlora",
    version=read_version(),
    description="A fused LoRA linear layer for PyTorch: forward and backward in one pass",
    packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "benchmarks.*")),
    python_requires=">=3.10",
    # The layer needs torch alone; the benchmark CLI's progress bar and plots are an extra.
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["tqdm", "matplotlib"],
        "peft": ["peft", "transformers", "safetensors"],
        "qlora": ["bitsandbytes>=0.45", "peft", "transformers", "safetensors"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft", "transformers", "safetensors", "tqdm", "matplotlib", "bitsandbytes>=0.45"],
    },
    entry_points={"console_scripts": ["fastlora=fastlora.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
