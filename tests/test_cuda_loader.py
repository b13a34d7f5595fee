"""The ``"cuda"`` backend's loader (``fastlora.ops._extension``) and, where ``fastlora._C`` is built, its
registration; CPU-runnable.

A missing, broken or failed-JIT build is one reason string and at most one warning, never an
exception; a built extension's ops carry the shared schemas beside the Python-registered ops, and
their fakes propagate shapes and dtypes.
"""

from __future__ import annotations

import importlib.util
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

