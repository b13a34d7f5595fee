"""Recording Triton launches instead of running them: ``intercepted_launches`` replaces Triton's launch
entry points (``Autotuner.run``, ``JITFunction.run``) within a block, so that an op module's
``launch_for_inspection`` can be run on CPU tensors with a target GPU's limits standing in
(``ops/_device.target_limits``). ``fastlora census`` counts launches with the same machinery."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import sys
from typing import NamedTuple

class Launch(NamedTuple):
    """One ``kernel[grid](*args, **kwargs)`` the op made; ``config`` is the autotuner's (None for a
    plain launch), ``pickable`` whether its pruning keeps it, ``via`` the function that
    ``launch_for_inspection`` called to make it (``triton_forward``, say)."""

    kernel: object
    args: tuple
    kwargs: dict
    config: object
    pickable: bool
    via: str


@contextlib.contextmanager
def intercepted_launches(launches: list):
    """Within the block, Triton launches are appended to ``launches`` instead of run. An autotuned
    launch becomes one launch per config of the autotuner, flagged by its own pruning."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    current = [None, True]  # the config being expanded, and whether it can be picked

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, current[0], current[1], _entry_point()))

    def autotuner_run(self, *args, **kwargs):
        # As Autotuner.run: pruning reads the positional arguments from self.nargs; one config is not pruned.
        self.nargs = dict(zip(self.arg_names, args))
        try:
            pickable = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        finally:
            self.nargs = None
        for config in self.configs:
            current[:] = config, config in pickable
            try:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                current[:] = None, True

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def _entry_point() -> str:
    """The name of the function that ``launch_for_inspection`` called on the way to this launch."""
    frame, below = sys._getframe(1), "launch_for_inspection"
    while frame is not None and frame.f_code.co_name != "launch_for_inspection":
        below, frame = frame.f_code.co_name, frame.f_back
    return below


def op_modules() -> tuple[list, list[str]]:
    """([(name, module)] of the op modules that define ``launch_for_inspection``, [import errors])."""
    from .. import ops

    found, errors = [], []
    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.startswith("_"):
            continue
        name = f"{ops.__name__}.{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception as err:  # an op module that does not import is reported, the others still run
            errors.append(f"{name}: import failed ({type(err).__name__}: {err})")
            continue
        if hasattr(module, "launch_for_inspection"):
            found.append((name, module))
    return found, errors


@contextlib.contextmanager
def stubbed_launches(launches: list):
    """Within the block, each Triton launch appends its kernel's name to ``launches`` and runs
    nothing (``fastlora census``). Unlike ``intercepted_launches`` an autotuned launch is one launch,
    as after its first call, whose configs are not expanded; Triton's own launch path (the
    autotuner's key and cache, the binder, the driver) is not run, so it is not in what is counted.

    A stubbed launch returns a stand-in compiled kernel (``_StubKernel``), so that fastlora's
    pre-bound launches (``ops._prebound``) plan on it as on a GPU: a signature's later calls go
    through the plan and the stand-in's C launcher records them, so the census counts and times the
    path a GPU runs after the first call. Plans are checked against Triton's real binder built for
    sm_90a on the CPU (the GPU path checks against its device's binder). They live in a table of
    their own (``_STUB_PLANS``), in place of the real one only within the block: kept from one block
    to the next (the census warms a call up in one block and counts it in another), never seen by a
    launch outside one."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from ..ops import _prebound
    from ..ops._triton_compile import _binder, target_of

    def record(self, *args, **kwargs):
        fn = self
        if isinstance(self, Autotuner):  # as its run would: the config the launch runs with
            self.best_config = self.configs[0]
        while hasattr(fn, "fn"):  # Autotuner → JITFunction → the Python function
            fn = fn.fn
        name = getattr(fn, "__name__", type(self).__name__)
        launches.append(name)
        return _StubKernel(name)

    saved = JITFunction.run, Autotuner.run, InterpretedFunction.run
    saved_prebound = _prebound.binder_of, _prebound.current_stream_getter, _prebound._plans, _recording[0]
    JITFunction.run = Autotuner.run = InterpretedFunction.run = record
    _prebound.binder_of = lambda jit: _binder(jit, target_of((9, 0)))[1]
    _prebound.current_stream_getter = lambda device: (_no_stream, None)
    _prebound._plans, _recording[0] = _STUB_PLANS, launches
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run, InterpretedFunction.run = saved
        _prebound.binder_of, _prebound.current_stream_getter, _prebound._plans, _recording[0] = saved_prebound


_STUB_PLANS: dict = {}  # stubbed_launches' plans (their kernels are _StubKernel)
_recording: list = [None]  # the innermost stubbed_launches block's record


def _no_stream(index) -> int:
    return 0


class _StubKernel:
    """A compiled kernel's stand-in for ``stubbed_launches``: its launcher records the launch."""

    packed_metadata = function = None

    def __init__(self, name: str):
        self.name = name

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        _recording[0].append(self.name)
