"""A missing, broken or too-old triton costs only the triton backend: ``import fastlora`` works,
``available_backends()`` says why, ``backend="auto"`` falls back and ``backend="triton"`` raises
``BackendUnavailableError`` with the reason. Installed-but-unusable gets exactly one warning."""

import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

from fastlora.ops._contract import LoRAOps
from fastlora.ops.registry import _load_triton

REPO = Path(__file__).resolve().parents[1]


class _RaisingFinder:
    """A meta-path finder that makes ``import triton`` raise ``error``, as a broken install does."""

    def __init__(self, error: Exception):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "triton":
            raise self.error
        return None


@pytest.fixture
def without_triton_modules(monkeypatch):
    """Forget the imported triton for one test (monkeypatch puts it back). Imported first where it is
    installed, so that what the test leaves in sys.modules (None, after a failed import) is undone
    even when no earlier test imported it."""
    try:
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 (not installed or broken here: nothing to restore)
        pass
    monkeypatch.setitem(sys.modules, "triton", sys.modules.get("triton"))
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)


def test_missing_triton_is_reported_without_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # how Python spells "not importable"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason = _load_triton()
    assert reason == "the triton package is not installed; install it with `pip install triton`"


@pytest.mark.usefixtures("without_triton_modules")
@pytest.mark.parametrize("error", [RuntimeError("CUDA driver initialization failed"), ImportError("libcuda.so.1: cannot open")], ids=repr)
def test_triton_failing_at_import_is_reported_with_one_warning(monkeypatch, error):
    monkeypatch.setattr(sys, "meta_path", [_RaisingFinder(error), *sys.meta_path])
    with pytest.warns(RuntimeWarning) as record:
        reason = _load_triton()
    assert reason == f"importing triton failed ({type(error).__name__}: {error}); reinstall a triton that matches your torch"
    assert [str(w.message) for w in record] == [f"fastlora: backend='triton' is disabled: {reason}"]
    # Later probes, torch's own included, now get the ImportError they know how to handle.
    with pytest.raises(ImportError):
        import triton  # noqa: F401


def fake_triton(version: str) -> types.ModuleType:
    module = types.ModuleType("triton")
    module.__version__ = version
    return module


@pytest.mark.parametrize("version", ["2.3.1", "2.1.0+cu121", "1.0", "3.4.0+git45fff310", "3.5.1"])
def test_old_triton_is_refused_with_one_warning(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "triton", fake_triton(version))
    monkeypatch.setitem(sys.modules, "triton.language", types.ModuleType("triton.language"))
    with pytest.warns(RuntimeWarning) as record:
        reason = _load_triton()
    assert reason == f"triton {version} is too old, the kernels need triton >= 3.6; upgrade with `pip install -U 'triton>=3.6'`"
    assert len(record) == 1


@pytest.mark.parametrize("version", ["3.6.0", "3.8.0+git45fff310", "10.1.0"])
def test_new_enough_triton_is_accepted(monkeypatch, version):
    pytest.importorskip("fastlora.ops.triton_lora")  # the real kernels must be importable here
    monkeypatch.setitem(sys.modules, "triton", fake_triton(version))
    monkeypatch.setitem(sys.modules, "triton.language", types.ModuleType("triton.language"))
    assert isinstance(_load_triton(), LoRAOps)


# Run in a fresh interpreter, since availability is settled once per process. The fake CUDA tensor
# (a FakeTensor needs no GPU) lets "auto" show whether a fused backend would be a candidate on a GPU.
PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastlora
    # Backends load on first use: this loads triton, which (broken) then reads as not importable to
    # torch's own probes too, e.g. FakeTensorMode's import of torch._dynamo below.
    available = {name: str(status) for name, status in fastlora.available_backends().items()}
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fastlora.ops.registry import FUSED_BACKENDS, cannot_run

with FakeTensorMode():
    x_gpu = torch.empty(4, 8, device="cuda", dtype=torch.float16)
    auto_candidates = [name for name in FUSED_BACKENDS if cannot_run(name, x_gpu, 4) is None]
x, w, b, A, B = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.randn(6, 2)
try:
    fastlora.lora_linear(x, w, b, A, B, 1.0, backend="triton")
    error = None
except fastlora.BackendUnavailableError as e:
    error = str(e)
out = fastlora.lora_linear(x, w, b, A, B, 1.0)
print(json.dumps({
    "warnings": [str(w.message) for w in caught if "fastlora" in str(w.message)],
    "available": available,
    "auto_candidates": auto_candidates,
    "error": error,
    "correct": torch.allclose(out, fastlora.reference.lora_linear(x, w, b, A, B, 1.0), atol=1e-5),
}))
"""


@pytest.mark.parametrize(
    "files, reason",
    [
        # A triton that raises at import, e.g. on a driver mismatch.
        (
            {"triton/__init__.py": "raise RuntimeError('CUDA driver initialization failed')"},
            "importing triton failed (RuntimeError: CUDA driver initialization failed)",
        ),
        # The real triton, reporting an old version.
        pytest.param(
            {"sitecustomize.py": "import triton; triton.__version__ = '2.2.0'"},
            "triton 2.2.0 is too old",
            marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed"),
        ),
    ],
    ids=["raises-at-import", "too-old"],
)
def test_fastlora_imports_and_falls_back(tmp_path, files, reason):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    available = result["available"]
    triton_reason = available["triton"].removeprefix("unavailable: ")
    assert available["torch"].startswith("available") and triton_reason.startswith(reason)
    assert result["warnings"] == [f"fastlora: backend='triton' is disabled: {triton_reason}"]
    assert result["auto_candidates"] == (["cuda"] if available["cuda"].startswith("available") else [])
    assert result["error"].startswith(f"backend='triton' is unavailable: {triton_reason}")
    assert result["correct"]
