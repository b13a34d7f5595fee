"""The backend registry loads lazily: ``import fastlora`` imports no triton, loads no ``_C`` and
initialises no CUDA, so fork-based workers work after it; each backend loads once, on first use,
even when threads race for it, or when it is first needed while ``torch.compile`` traces."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastlora
from fastlora.ops import registry

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import multiprocessing, sys
import torch
import fastlora

def worker(seed):
    torch.manual_seed(seed)
    x, w, A, B = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    out = fastlora.lora_linear(x, w, None, A, B, 0.5)
    return bool(torch.allclose(out, fastlora.reference.lora_linear(x, w, None, A, B, 0.5), atol=1e-5))

assert "triton" not in sys.modules, "import fastlora imported triton"
assert "fastlora._C" not in sys.modules, "import fastlora loaded fastlora._C"
assert not torch.cuda.is_initialized(), "import fastlora initialised CUDA"
with multiprocessing.get_context("fork").Pool(2) as pool:
    assert pool.map(worker, [0, 1]) == [True, True]
statuses = fastlora.available_backends()  # loads every backend: still no CUDA context
assert not torch.cuda.is_initialized(), "loading the backends initialised CUDA"
assert ("triton" in sys.modules) == statuses["triton"].available
print("ok")
"""


def test_import_is_lazy_and_fork_safe():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("ok")


def test_a_backend_loads_once_when_threads_race(monkeypatch):
    calls = []
    start = threading.Barrier(8)

    def slow_loader():
        calls.append(1)
        threading.Event().wait(0.05)  # long enough for every thread to arrive meanwhile
        return "not a real backend"

    monkeypatch.setitem(registry._LOADERS, "racy", slow_loader)
    monkeypatch.delitem(registry._loaded, "racy", raising=False)
    results = []

    def first_use():
        start.wait()
        results.append(registry.backend_state("racy"))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.delitem(registry._loaded, "racy")
    assert len(calls) == 1 and results == ["not a real backend"] * 8


def test_statuses_explain_themselves():
    statuses = fastlora.available_backends()
    assert set(statuses) == {"torch", "triton", "cuda"}
    assert statuses["torch"].available and str(statuses["torch"]).startswith("available: ")
    for status in statuses.values():
        assert status.detail and str(status).startswith("available: " if status.available else "unavailable: ")
    if not torch.cuda.is_available():
        assert not statuses["cuda"].available and "CUDA" in statuses["cuda"].detail


COMPILE_FIRST = """
import torch, fastlora
from fastlora.ops import registry
assert "triton" not in registry._loaded
x, w, A, B = torch.randn(4, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
compiled = torch.compile(lambda *inputs: fastlora.lora_linear(*inputs, 0.5, backend="triton"))
for _ in range(2):
    out = compiled(x, w, None, A, B)
    torch.testing.assert_close(out, fastlora.reference.lora_linear(x, w, None, A, B, 0.5))
print("ok")
"""


def test_a_backend_first_needed_while_compiling_loads_outside_the_trace():
    if not fastlora.available_backends()["triton"].available or torch.cuda.is_available():
        pytest.skip("needs triton under the interpreter (a CPU machine)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", COMPILE_FIRST], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("ok")


LAYERING = """
import importlib.util, sys, types
from pathlib import Path
root = Path(sys.argv[1]) / "fastlora"
# The package's __init__ imports everything (fastlora.explain_backend lives in ops.auto): stand-in
# packages let the registry module be imported on its own, with only what it imports itself.
for name, path in (("fastlora", root), ("fastlora.ops", root / "ops")):
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    sys.modules[name] = package
import fastlora.ops.registry as registry
assert registry.available_backends()["torch"].available
above = sorted(m for m in sys.modules if m.startswith("fastlora.") and m.split(".")[-1] in ("auto", "dispatch", "gate", "functional", "layers"))
assert not above, f"the registry imported {above}"
print("ok")
"""


def test_the_registry_imports_nothing_above_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", LAYERING, str(REPO)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("ok")


def test_no_module_level_import_circle_through_the_backend_resolution():
    """registry → auto → dispatch, one direction: no module-level import of fastlora/ops closes a
    circle through them (found from the source, so a lazy import inside a function is allowed)."""
    import ast

    ops = REPO / "fastlora" / "ops"
    graph = {}
    for path in ops.glob("*.py"):
        imports = set()
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imports.add(node.module.split(".")[0])
                else:
                    imports.update(alias.name for alias in node.names)
        graph[path.stem] = imports

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    for name in ("registry", "auto", "dispatch", "gate", "autotune_cache", "candidates", "auto_4bit"):
        assert not reaches(name, name), f"fastlora/ops/{name}.py imports itself back through {graph[name]}"
    assert not reaches("registry", "auto") and not reaches("registry", "dispatch")


def test_importing_the_registry_or_fastlora_does_not_import_auto():
    """As a user checks it: ``import fastlora.ops.registry`` (which imports the ``fastlora`` package
    first) leaves ``fastlora.ops.auto`` out of ``sys.modules``; the first ``lora_linear`` or
    ``fastlora.explain_backend`` loads it."""
    code = (
        "import sys, torch, fastlora.ops.registry\n"
        "assert 'fastlora.ops.auto' not in sys.modules, sorted(m for m in sys.modules if m.startswith('fastlora'))\n"
        "import fastlora\n"
        "assert 'fastlora.ops.auto' not in sys.modules\n"
        "y = fastlora.lora_linear(torch.randn(3, 8), torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), 1.0)\n"
        "assert y.shape == (3, 5) and 'fastlora.ops.auto' in sys.modules\n"
        "assert callable(fastlora.explain_backend) and callable(fastlora.set_default_backend)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
