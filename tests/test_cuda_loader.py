"""The ``"cuda"`` backend's loader (``fastlora.ops._extension``) and, where ``fastlora._C`` is built, its
registration; CPU-runnable.

A missing, broken or failed-JIT build is one reason string and at most one warning, never an
exception; a built extension's ops carry the shared schemas beside the Python-registered ops, and
their fakes propagate shapes and dtypes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastlora
from fastlora.ops import _extension
from fastlora.ops._contract import BACKWARD_SCHEMA, FORWARD_SCHEMA, attach_autograd, define_ops
from fastlora.ops.registry import backend_ops

_CUDA_STATUS = fastlora.available_backends()["cuda"]
CUDA_REASON = None if _CUDA_STATUS.available else _CUDA_STATUS.detail
BUILT = importlib.util.find_spec("fastlora._C") is not None
requires_built = pytest.mark.skipif(not BUILT, reason="fastlora._C is not built (see .ci/build_cuda.sh)")


def _load_uncached():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = _extension.load_extension.__wrapped__()
    return reason, [w for w in caught if "fastlora" in str(w.message)]


def test_import_emits_no_fastlora_warning_and_reports_cuda():
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import torch, fastlora\n"
        "    backends = fastlora.available_backends()\n"
        "print([str(w.message) for w in caught if 'fastlora' in str(w.message)])\n"
        "print(backends['cuda'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTLORA_JIT_BUILD"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], check=True
    )
    fastlora_warnings, cuda_reason = result.stdout.splitlines()[-2:]
    assert fastlora_warnings == "[]"
    if not torch.cuda.is_available():
        assert "CUDA" in cuda_reason


def test_not_built_is_a_silent_reason_naming_the_fix(monkeypatch):
    monkeypatch.setattr(_extension, "_MODULE", "fastlora._C_not_built_here")
    monkeypatch.delenv("FASTLORA_JIT_BUILD", raising=False)
    reason, warned = _load_uncached()
    assert "is not built" in reason and "FASTLORA_FORCE_CUDA_BUILD=1" in reason and "FASTLORA_JIT_BUILD=1" in reason
    assert warned == []


def test_broken_build_is_one_warning(monkeypatch, tmp_path):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_C.py").write_text("raise ImportError('undefined symbol: _ZN3c1017SomethingElse')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_extension, "_MODULE", "brokenpkg._C")
    monkeypatch.delenv("FASTLORA_JIT_BUILD", raising=False)
    reason, warned = _load_uncached()
    assert "failed to load" in reason and "undefined symbol" in reason
    assert len(warned) == 1


def test_failed_jit_build_is_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_MODULE", "fastlora._C_not_built_here")
    monkeypatch.setattr(_extension, "_CSRC", tmp_path)  # no sources: fails before any compiler runs
    monkeypatch.setenv("FASTLORA_JIT_BUILD", "1")
    reason, warned = _load_uncached()
    assert "FASTLORA_JIT_BUILD=1" in reason
    assert len(warned) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_a_device_the_reason_says_so():
    from fastlora.ops.cuda_lora import load_cuda_ops

    reason = load_cuda_ops()
    assert isinstance(reason, str) and "CUDA" in reason


# ---------------------------------------------------------------- build description (CPU) ----------

ROOT = Path(__file__).resolve().parents[1]


def _setup_py(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``setup.py --version`` (which decides on the extension, and builds nothing) under env."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FASTLORA_", "CUTLASS_PATH"))}, **env}
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)


def test_build_requirements_pin_cutlass_and_leave_torch_to_the_environment():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert "nvidia-cutlass==4.2.0.0" in requires
    assert not any(req.startswith("torch") for req in requires)  # must match the runtime torch: --no-build-isolation
    # .ci/build_cuda.sh installs the pin it greps out of pyproject.toml.
    assert re.findall(r'"(nvidia-cutlass==[^"]*)"', (ROOT / "pyproject.toml").read_text()) == ["nvidia-cutlass==4.2.0.0"]


def test_forced_build_that_cannot_build_fails_with_the_reason(tmp_path):
    result = _setup_py({"FASTLORA_FORCE_CUDA_BUILD": "1", "CUTLASS_PATH": str(tmp_path)})
    assert result.returncode != 0
    assert "FASTLORA_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built" in result.stderr
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is not None and CUDA_HOME is not None:  # the first missing piece is CUTLASS
        assert f"CUTLASS_PATH={tmp_path} has no {tmp_path / 'include' / 'cute' / 'tensor.hpp'}" in result.stderr


def test_unforced_build_without_cutlass_installs_the_python_package(tmp_path):
    result = _setup_py({"CUTLASS_PATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == fastlora.__version__
    skipped = _setup_py({"FASTLORA_SKIP_CUDA_BUILD": "1", "FASTLORA_FORCE_CUDA_BUILD": "1", "CUTLASS_PATH": str(tmp_path)})
    assert skipped.returncode == 0  # SKIP wins over FORCE


# setup.py build_ext with torch's ninja run replaced by a recorder: every ninja file the build would
# run (one per set of targets), then the link fails on the objects that were never compiled.
_RECORD_NINJA_FILES = """
import json, pathlib, runpy, sys
import torch.utils.cpp_extension as cpp
seen = []
cpp._run_ninja_build = lambda build_directory, *args, **kwargs: seen.append(
    (pathlib.Path(build_directory) / "build.ninja").read_text())
sys.argv = ["setup.py", "build_ext", "--build-temp", sys.argv[1], "--build-lib", sys.argv[1]]
try:
    runpy.run_path("setup.py", run_name="__main__")
except BaseException:
    pass
print(json.dumps(seen))
"""


def _targets_per_object(ninja_files: list[str]) -> dict[str, set[str]]:
    """{object file name: its nvcc -gencode flags} over the recorded ninja files."""
    targets = {}
    for text in ninja_files:
        post = re.search(r"^cuda_post_cflags = (.*)$", text, re.MULTILINE)
        flags = set(re.findall(r"-gencode=\S+", post.group(1))) if post else set()
        for obj, rule in re.findall(r"^build (\S+): (\w+) ", text, re.MULTILINE):
            targets[Path(obj).name] = flags if rule == "cuda_compile" else {"host"}
    return targets


@pytest.mark.slow
@pytest.mark.parametrize("archs", ["80;90a", "80;86", "90a"])
def test_build_compiles_each_cutlass_file_only_for_the_gpus_that_run_it(tmp_path, archs):
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip("needs a CUDA build of torch and the CUDA toolkit (no compile is run)")
    if isinstance(_extension._cutlass_include_dirs(), str):
        pytest.skip("needs the CUTLASS headers (pip install nvidia-cutlass==4.2.0.0)")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FASTLORA_")}}
    env.update(FASTLORA_FORCE_CUDA_BUILD="1", FASTLORA_CUDA_ARCHS=archs)
    result = subprocess.run([sys.executable, "-c", _RECORD_NINJA_FILES, str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    targets = _targets_per_object(json.loads(result.stdout.strip().splitlines()[-1]))
    sm80, sm86, sm90a = "-gencode=arch=compute_{0},code=sm_{0}", "-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90a,code=sm_90a"
    ptx = "-gencode=arch=compute_{0},code=compute_{0}"
    everything = {
        "80;90a": {sm80.format(80), ptx.format(80), sm90a},
        "80;86": {sm80.format(80), ptx.format(80), sm86, ptx.format(86)},
        "90a": {sm90a},
    }[archs]
    assert targets["lora_ops.o"] == {"host"}
    assert targets["lora_kernels.o"] == everything  # the portable kernels run everywhere
    assert targets["lora_narrow.o"] == everything  # so do the rank-r passes
    for dtype in ("bf16", "f16"):
        # Hopper kernels: only where they run (empty files without 90a, so those keep every target).
        assert targets[f"lora_sm90_{dtype}.o"] == ({sm90a} if "90a" in archs else everything)
        # Ampere-class kernels: everywhere but on 9.0 of a 90a build (the Hopper kernel runs there).
        assert targets[f"lora_sm80_{dtype}.o"] == (everything - {sm90a} or everything)


# ---------------------------------------------------------------- built extension (CPU) ----------


def _cuda_ops():
    """The cuda ops, defined from the shared schemas with fakes and autograd attached (by the backend
    where it loaded, else here: without a GPU the backend does not load)."""
    if CUDA_REASON is None:
        return backend_ops("cuda")
    assert _extension.load_extension() is None
    if not hasattr(_cuda_ops, "attached"):
        _cuda_ops.attached = attach_autograd(*define_ops("fastlora", "cuda"), runs_on=("cuda",))
    return _cuda_ops.attached


@requires_built
def test_extension_implements_the_ops_defined_from_the_shared_schemas():
    ops = _cuda_ops()
    assert ops.forward._schema == torch._C.parse_schema("fastlora::cuda_forward" + FORWARD_SCHEMA)
    assert ops.backward._schema == torch._C.parse_schema("fastlora::cuda_backward" + BACKWARD_SCHEMA)
    for name in ("fastlora::cuda_forward", "fastlora::cuda_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
    # The Python backends' ops live in the same namespace (torch.library FRAGMENTs).
    assert torch.ops.fastlora.torch_forward.default._schema.name == "fastlora::torch_forward"


@requires_built
def test_fakes_propagate_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = _cuda_ops()
    m, k, n, r = 7, 16, 12, 4
    with FakeTensorMode():
        x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        A = torch.empty(r, k, device="cuda")
        B = torch.empty(n, r, device="cuda")
        y, xa = ops.forward(x, w, None, A, B, 0.5, 0.0, None)
        grads = ops.backward(y, x, xa, w, A, B, 0.5, 0.0, None, True, True, False, True)
    assert (y.shape, y.dtype, xa.shape, xa.dtype) == ((m, n), torch.bfloat16, (m, r), torch.float32)
    assert [(g.shape, g.dtype) for g in grads] == [
        ((m, k), torch.bfloat16),
        ((r, k), torch.float32),
        ((0,), torch.float32),
        ((n,), torch.bfloat16),
    ]

