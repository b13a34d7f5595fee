"""Build and install fastlora; torch must already be installed (``pip install --no-build-isolation``,
see pyproject.toml for why torch is not a build requirement).

The package is pure Python plus an optional CUDA extension, ``fastlora._C`` (``csrc/``), which backs
``backend="cuda"``. The extension is built when torch sees a GPU, or when forced; without torch, a
CUDA build of torch, the CUDA toolkit or the CUTLASS headers, setup warns and installs the
pure-Python package, except when forced: then it stops with the reason.

Environment flags:
    FASTLORA_FORCE_CUDA_BUILD=1  build the extension even without a visible GPU (e.g. on a CPU build
                                 machine with the toolkit); anything that prevents the build (no
                                 torch, no toolkit, no CUTLASS, a compile error) then fails the install.
    FASTLORA_SKIP_CUDA_BUILD=1   never build it.
    FASTLORA_CUDA_ARCHS          ';'-separated targets, default "80;90a" (A100, H100). The kernels
                                 need sm_80 or newer. Non-"a" targets also embed PTX for newer GPUs.
    CUDA_HOME                    the toolkit root, if nvcc is not on PATH.
    CUTLASS_PATH                 a CUTLASS checkout (its include/ and tools/util/include/), instead of
                                 the headers of the installed nvidia-cutlass wheel (pinned in pyproject.toml).
    MAX_JOBS                     parallel compile jobs (ninja).
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"


def read_version() -> str:
    text = (ROOT / "fastlora" / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("fastlora/__init__.py defines no __version__")
    return match.group(1)


def parse_archs(archs: str) -> list[str]:
    """ "80;90a" -> ["80", "90a"], each checked to be a compute capability."""
    parsed = [a.strip().replace(".", "") for a in archs.split(";") if a.strip()]
    for arch in parsed:
        if not re.fullmatch(r"\d+[af]?", arch):
            raise ValueError(f"FASTLORA_CUDA_ARCHS: {arch!r} is not a compute capability like 80 or 90a")
    return parsed


def gencode_flags(archs: str | list[str]) -> list[str]:
    """nvcc -gencode flags for "80;90a"-style targets: SASS for each, plus PTX for portable ones."""
    flags = []
    for arch in parse_archs(archs) if isinstance(archs, str) else archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        # Arch-specific ("a"/"f") code runs on its own chip family only; portable PTX lets newer GPUs JIT.
        if arch[-1] not in "af":
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def source_archs(source: str, archs: list[str]) -> list[str]:
    """The targets one csrc/ file is compiled for: a CUTLASS kernel only for the GPUs that can run it.

    Each target is a full device compile (cicc, ptxas) of the file's templates, so this is most of
    the build's time. lora_sm90_*.cu hold the Hopper kernels, launched only on compute capability 9.0
    from their sm_90a SASS: 90a alone (without 90a in the build they are empty, and keep all targets).
    lora_sm80_*.cu hold the Ampere-class kernels, which the host code never launches on 9.0 when the
    build has 90a (lora_ops.cpp takes the Hopper kernel there, or the portable one if CUTLASS rejects
    the problem): every target but 90a, unless 90a is all there is. The portable kernels and the host
    code run everywhere: every target. Measured per file (nvcc -time, 80;90a): an sm90 file spent
    ~15 % of its time on the sm_80/compute_80 pass, an sm80 file ~45 % on the sm_90a one.
    """
    name = Path(source).name
    if name.startswith("lora_sm90_") and "90a" in archs:
        return ["90a"]
    if name.startswith("lora_sm80_"):
        return [a for a in archs if a != "90a"] or archs
    return archs


def cutlass_include_dirs() -> tuple[list[str], str | None]:
    """(include dirs, None) for the CUTLASS/CuTe headers, or ([], what is missing)."""
    if os.environ.get("CUTLASS_PATH"):
        root = Path(os.environ["CUTLASS_PATH"])
        source = f"CUTLASS_PATH={root}"
    else:
        # The nvidia-cutlass wheel ships the C++ headers inside its cutlass_library package; find it
        # without importing it (its import pulls in the Python code generator).
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return [], (
                "the CUTLASS headers are missing: the nvidia-cutlass package is not installed in this environment "
                "(pip install nvidia-cutlass==4.2.0.0) and CUTLASS_PATH is not set"
            )
        root = Path(next(iter(spec.submodule_search_locations))) / "source"
        source = f"the nvidia-cutlass package at {root}"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    for d, header in zip(dirs, ("cute/tensor.hpp", "cutlass/util/packed_stride.hpp")):
        if not (d / header).is_file():
            return [], f"the CUTLASS headers are missing: {source} has no {d / header}"
    return [str(d) for d in dirs], None


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for fastlora._C, or ([], {}) with the reason given as a warning; when
    the build is forced, a reason not to build raises instead (pip shows the error, not warnings)."""
    forced = os.environ.get("FASTLORA_FORCE_CUDA_BUILD") == "1"

    def skip(reason: str) -> tuple[list, dict]:
        if forced:
            raise RuntimeError(f"fastlora: FASTLORA_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
        warnings.warn(f"fastlora: building without the CUDA extension ({reason}); backend='cuda' will be unavailable")
        return [], {}

    if os.environ.get("FASTLORA_SKIP_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        return skip(
            f"torch is not importable in the build environment ({err}); install torch first and build with "
            "pip's --no-build-isolation"
        )
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if not (forced or torch.cuda.is_available()):
        return skip("no GPU is visible; set FASTLORA_FORCE_CUDA_BUILD=1 to build anyway")
    if CUDA_HOME is None:
        return skip("no CUDA toolkit found; set CUDA_HOME or put nvcc on PATH")
    cutlass_dirs, missing = cutlass_include_dirs()
    if missing is not None:
        return skip(missing)

    class BuildExt(BuildExtension):
        """Compiles each csrc/ file for its own targets (source_archs); unless forced, a failed compile
        degrades to a pure-Python install instead of failing it."""

        def build_extension(self, ext):
            try:
                self._compile_narrowed(ext)
                super().build_extension(ext)
            except Exception as err:
                if ext.name != "fastlora._C":  # the optional host extension: pure Python instead
                    warnings.warn(f"fastlora: compiling {ext.name} failed ({err}); its Python fallback runs")
                    return
                if forced:
                    raise
                warnings.warn(f"fastlora: compiling {ext.name} failed ({err}); backend='cuda' will be unavailable")

        def _compile_narrowed(self, ext):
            # torch's BuildExtension gives every source one set of nvcc flags, so the files whose
            # targets differ from the build's are compiled first, one compiler call per target set
            # (through the same ninja-backed compiler, with torch's flags already in
            # extra_compile_args), and linked in as extra objects.
            groups: dict[tuple[str, ...], list[str]] = {}
            for source in ext.sources:
                if source.endswith(".cu") and (narrowed := source_archs(source, archs)) != archs:
                    groups.setdefault(tuple(narrowed), []).append(source)
            if not groups:
                return
            base_nvcc = [f for f in ext.extra_compile_args["nvcc"] if not f.startswith("-gencode")]
            objects = []
            for targets, sources in groups.items():
                args = {**ext.extra_compile_args, "nvcc": [*base_nvcc, *gencode_flags(list(targets))]}
                objects += self.compiler.compile(
                    sources,
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=args,
                    depends=ext.depends,
                )
            done = {s for group in groups.values() for s in group}
            ext.sources = [s for s in ext.sources if s not in done]
            ext.extra_objects = [*objects, *(ext.extra_objects or [])]
            # setuptools relinks only when a source or dependency is newer than the library.
            ext.depends = [*ext.depends, *sorted(done)]

    # No --use_fast_math: it flushes fp32 denormals and changes rounding, which the fp32 path's 1e-5
    # accuracy and the reference semantics do not allow; the kernels gain little from it anyway.
    # CUTLASS needs C++17 and relaxed constexpr, and its half/bfloat16 types need the conversions and
    # operators that torch's extension flags (-D__CUDA_NO_HALF_OPERATORS__ ...) switch off. NDEBUG
    # drops CuTe's device asserts: their __assertfail calls made ptxas serialise every wgmma of the
    # sm90 kernels ("wgmma pipeline crossing function boundary", C7510).
    cutlass_flags = ["-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG"] + [
        f"-U__CUDA_NO_{what}__"
        for what in ("HALF_OPERATORS", "HALF_CONVERSIONS", "HALF2_OPERATORS", "BFLOAT16_OPERATORS", "BFLOAT16_CONVERSIONS")
    ]
    archs = parse_archs(os.environ.get("FASTLORA_CUDA_ARCHS", DEFAULT_ARCHS))
    # FASTLORA_CUTLASS: the CUTLASS kernels exist (the CPU emulation of csrc/ builds without them).
    # FASTLORA_SM90A: the Hopper kernels (csrc/lora_sm90_*.cu) exist only in an sm_90a build; the host
    # code takes their path only then, so a build without it never launches a kernel missing from it.
    defines = ["-DFASTLORA_CUTLASS"] + (["-DFASTLORA_SM90A"] if "90a" in archs else [])
    nvcc_flags = ["-O3", "-lineinfo", *defines, *cutlass_flags, *gencode_flags(archs)]
    extension = CUDAExtension(
        name="fastlora._C",
        sources=sorted(str(p.relative_to(ROOT)) for p in (*ROOT.glob("csrc/*.cpp"), *ROOT.glob("csrc/*.cu"))),
        depends=sorted(str(p.relative_to(ROOT)) for p in (*ROOT.glob("csrc/*.cuh"), *ROOT.glob("csrc/*.hpp"))),
        include_dirs=cutlass_dirs,
        # -g0: Python's own CFLAGS (which setuptools passes to the host compiler) carry -g, and debug
        # information for torch's dispatcher templates was half of lora_ops.cpp's compile (19.5 s
        # user with it, 10.7 s without, measured).
        extra_compile_args={"cxx": ["-O3", "-g0", *defines], "nvcc": nvcc_flags},
    )
    return [extension], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
# The pre-bound launches' hit path in C (ops/_prebound.py, csrc/host/prebound.c): plain CPython, no
# torch or CUDA headers; optional, so that a machine without a C compiler installs the pure-Python
# package (the same launches, about 5 µs more host time each).
ext_modules.append(Extension("fastlora._prebound_c", sources=["csrc/host/prebound.c"], optional=True))

# The distribution is "fastlora-kernels": PyPI's "fastlora" is an unrelated project. The import
# name stays `fastlora`. Until it is published, install from a checkout (README: pip install -e).
setup(
    name="fastlora-kernels",
    version=read_version(),
    description="A fused LoRA linear layer for PyTorch: forward and backward in one pass (import fastlora)",
    packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "benchmarks.*")),
    python_requires=">=3.10",
    # The layer needs torch alone; the benchmark CLI's progress bar and plots are an extra.
    install_requires=["torch>=2.6"],
    extras_require={
        # 3.6 is the oldest Triton CI checks (.ci/run; the GPU image's). Older ones that load (3.0+)
        # run with the compiler-informed config pruning off (ops/_triton_compile.py), unverified.
        # Under triton 3.6 the interpreter (TRITON_INTERPRET=1) needs numpy < 2.4.
        "triton": ["triton>=3.6"],
        "bench": ["tqdm", "matplotlib"],
        "peft": ["peft", "transformers", "safetensors"],
        "qlora": ["bitsandbytes>=0.45", "peft", "transformers", "safetensors"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft", "transformers", "safetensors", "tqdm", "matplotlib", "bitsandbytes>=0.45"],
    },
    entry_points={"console_scripts": ["fastlora=fastlora.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
