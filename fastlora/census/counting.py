"""What one call costs outside the kernels, counted on the CPU: Triton launches (stubbed, not run),
ATen ops by kind (through a ``TorchDispatchMode`` that also stubs their compute), and Python calls
(``sys.setprofile``).

``StubCompute`` lets a call run at a training-sized shape (M = 8192, K = N = 4096) on CPU tensors
without computing anything: views and allocations (``empty*``) run, since they only make tensor
metadata and untouched memory; every other op's output is an uninitialised tensor of the shape and
strides its meta kernel gives (an in-place op returns its ``self``). Counts do not depend on values,
so they are the real call's; a value read back (``int(seed)``) is garbage, which no count depends on.

Python calls are counted on the calling thread (the autograd engine runs a CPU graph's backward on
the thread that calls it), minus the counters' and stubs' frames and everything under them (the
dispatch mode, the launch stubs), so that only the code a real call runs is counted.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

# ATen ops by what they cost on a GPU (names as OpOverload.__name__ before the overload: "zeros", "fill_").
MEMSET_OPS = frozenset({"zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like", "new_full", "ones",
                        "ones_like", "new_ones"})  # fmt: skip
ALLOC_OPS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
# Views that are not flagged ``is_view`` but make no kernel either.
METADATA_OPS = frozenset({"detach", "alias", "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride", "set_"})

_PACKAGE_FILES = None


def _own_files() -> frozenset:
    """Source files whose frames (and all under them) the Python-call count leaves out: the counters
    (this file) and the launch stubs (``fastlora/inspect/recording.py``). The census's own closure
    around each call (one frame) is counted."""
    global _PACKAGE_FILES
    if _PACKAGE_FILES is None:
        from ..inspect import recording

        _PACKAGE_FILES = frozenset({os.path.abspath(__file__), os.path.abspath(recording.__file__)})
    return _PACKAGE_FILES


def op_kind(func) -> str:
    """``"memset"``, ``"alloc"``, ``"view"`` or ``"compute"`` (a kernel on a GPU) for an ATen op."""
    name = func.__name__.split(".")[0]
    if name in MEMSET_OPS:
        return "memset"
    if name in ALLOC_OPS:
        return "alloc"
    if func.is_view or name in METADATA_OPS:
        return "view"
    return "compute"


def _scalar_only(args, kwargs) -> bool:
    """Whether an op reads no tensor but 0-d ones: in fastlora's calls that is the dropout seed,
    ``torch.randint(..., ())`` on the CPU, which stays on the host on a GPU run too."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return all(t.dim() == 0 for t in tensors) and not any(isinstance(a, (list, tuple)) and len(a) for a in args)


def _to_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) and value.device.type != "meta" else value


def _from_meta(device):
    def convert(value):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
        return value

    return convert


def _written_argument(func) -> int | None:
    """The position of the first argument an in-place or out= op writes (returned as its result)."""
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            return i
    return None


class StubCompute(TorchDispatchMode):
    """Counts every ATen op (``ops``: op name → calls) and runs only views and allocations; see the
    module doc. With ``stub=False`` every op runs (counting only)."""

    def __init__(self, stub: bool = True):
        super().__init__()
        self.stub = stub
        self.ops: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = op_kind(func)
        if kind == "compute" and _scalar_only(args, kwargs):
            kind = "scalar"
        self.ops[str(func)] += 1
        self.kinds[kind] += 1
        if not self.stub or kind in ("view", "alloc"):
            return func(*args, **kwargs)
        written = _written_argument(func)
        if written is not None:
            names = [a.name for a in func._schema.arguments]
            target = args[written] if written < len(args) else kwargs.get(names[written])
            if isinstance(target, torch.Tensor):
                return target
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        try:
            out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        except Exception:  # an op without a meta kernel runs for real (counted all the same)
            return func(*args, **kwargs)
        return tree_map(_from_meta(device), out)


# Frames torch runs between the dispatcher and a Python dispatch mode's ``__torch_dispatch__`` (its
# rule look-up and the dynamo-disabling wrapper): the counting mode's cost, not the call's.
_DISPATCH_CHAIN = ("torch/_library/", "torch/_compile.py", "torch/_dynamo/", "torch/compiler/")


class PythonCalls:
    """Counts Python function calls on this thread while active (``sys.setprofile``), leaving out
    ``_own_files()``' frames and everything they call, and the frames that lead from the dispatcher
    into ``StubCompute`` (a chain that starts in ``torch/_library``'s rule look-up and ends in the
    mode: held back while it lasts, dropped if it ends in the mode, counted if not)."""

    def __init__(self):
        self.calls = 0
        self._skip_depth = 0
        self._pending = 0
        self._own = _own_files()

    def _profile(self, frame, event, arg):
        if event != "call":
            if event == "return" and self._skip_depth:
                self._skip_depth -= 1
            return
        if self._skip_depth:
            self._skip_depth += 1
            return
        filename = frame.f_code.co_filename
        if filename in self._own:
            self._skip_depth, self._pending = 1, 0  # the chain (if any) led into the mode: not counted
            return
        if self._pending or "torch/_library/" in filename:
            if any(part in filename for part in _DISPATCH_CHAIN):
                self._pending += 1
                return
            self.calls, self._pending = self.calls + self._pending, 0
        self.calls += 1

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        self.calls, self._pending = self.calls + self._pending, 0


@contextlib.contextmanager
def stubbed_triton(launches: list):
    """Within the block, Triton launches append the kernel's name to ``launches`` and run nothing;
    an autotuned launch is one launch (its config as cached after the first call, not expanded)."""
    from ..inspect.recording import stubbed_launches

    with stubbed_launches(launches):
        yield launches


def count_call(call, *, stub: bool = True) -> dict:
    """Run ``call()`` once under every counter: ``{"launches", "memsets", "allocs", "compute", "scalar",
    "views", "python_calls", "aten": {op: n}, "kernels": [name, ...]}``."""
    launches: list = []
    with stubbed_triton(launches):
        mode = StubCompute(stub)
        with mode:
            python = PythonCalls()
            with python:
                call()
    kinds = mode.kinds
    return {
        "launches": len(launches),
        "memsets": kinds["memset"],
        "allocs": kinds["alloc"],
        "compute": kinds["compute"],
        "scalar": kinds["scalar"],
        "views": kinds["view"],
        "python_calls": python.calls,
        "aten": dict(sorted(mode.ops.items())),
        "kernels": list(launches),
    }

