"""Test set-up: on a machine without a GPU the Triton kernels run under Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, i.e. before
``fastlora`` is imported, so it is set here, at collection time. ``backend="auto"`` remembers its
GPU measurements in a throw-away directory, not in the user's cache.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLORA_CACHE_DIR", tempfile.mkdtemp(prefix="fastlora-test-cache-"))


@pytest.fixture
def timed_cpu(monkeypatch, tmp_path):
    """``backend="auto"`` timing enabled for CPU tensors, with the torch backend's ops standing in
    for runnable "triton" and "cuda", an empty cache directory and no pin; all restored afterwards
    (tests/test_auto*.py). Yields the autotune cache file's path."""
    from fastlora.ops import auto, registry

    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTLORA_BACKEND", raising=False)
    monkeypatch.setattr(auto, "TIMED_DEVICE_TYPES", ("cpu",))
    stand_in = registry.backend_ops("torch")._replace(runs_on=("cpu",))
    for name in ("triton", "cuda"):
        monkeypatch.setitem(registry._loaded, name, stand_in)
    auto.clear_memory()
    yield tmp_path / "autotune.json"
    auto.set_timer(None)
    auto.set_default_backend(None)
    auto.clear_memory()
