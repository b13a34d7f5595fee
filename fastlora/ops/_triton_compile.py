"""Compile a Triton kernel for a GPU target without launching it, and read what the compiler made of it.

Shared by the autotuners' pruning (``drop_spilling``: a config the compiler says spills registers or
overflows shared memory is never timed) and by ``fastlora inspect`` (the compiled code of every kernel
for sm_90a and sm_80, on a machine with no GPU).

A launch ``kernel[grid](*args, **kwargs)`` is specialised here exactly as the JIT specialises it (with
the JIT's own binder, for the target's backend): pointer and integer arguments divisible by 16 get
``tt.divisibility=16``, integers equal to 1 become constexprs. Both matter: compiled without them the
software pipeliner silently does nothing (one stage of shared memory, no cp.async) and what is read
off the cubin misleads. Because the result is the JIT's own compile, on a GPU the launch that follows
finds it in Triton's cache. ``create_function_from_signature`` and ``JITFunction._pack_args`` are
private to Triton but have the same signature in 3.6 and 3.8; ``tests/test_inspect.py`` checks them.
Triton 3.4 has neither ``JITFunction._pack_args`` nor ``knobs.compilation.instrumentation_mode``: where
any private piece this needs is missing (``missing_private_api``), or specialising raises, the
compiler-informed pruning turns itself off with one warning and ``drop_spilling`` returns the configs
the formula pruning kept, so a launch never fails for the pruning's sake (``fastlora inspect`` needs
them and says so).

Nothing here compiles at import, and under ``TRITON_INTERPRET=1`` ``drop_spilling`` returns the
configs unchanged (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
import warnings
from typing import Any, NamedTuple

import torch

from ._device import device_limits

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class Resources(NamedTuple):
    """Per thread ``registers``; ``stack_bytes`` of stack frame and local memory per thread (in a Triton
    kernel only register spills use either); dynamic ``shared_bytes`` per program."""

    registers: int
    stack_bytes: int
    shared_bytes: int


class Compiled(NamedTuple):
    """One kernel × specialisation × config × target: the ``cubin`` and its ``resources``, or the
    compiler's ``error``."""

    name: str
    cubin: bytes | None
    resources: Resources | None
    error: str | None


class Specialisation(NamedTuple):
    """What ``triton.compile`` takes for one launch: ``ASTSource(fn, signature, constexprs, attrs)``
    and the backend's ``options``."""

    signature: dict
    constexprs: dict
    attrs: dict
    options: Any

    def key(self) -> str:
        return repr((self.signature, self.constexprs, self.attrs, self.options))


# (module, attribute path) of every private piece of Triton that specialise/compile_for use.
PRIVATE_API = (
    ("triton.runtime.jit", "create_function_from_signature"),
    ("triton.runtime.jit", "JITFunction._pack_args"),
    ("triton.compiler", "make_backend"),
    ("triton.compiler", "ASTSource"),
    ("triton.backends.compiler", "GPUTarget"),
    ("triton", "knobs.compilation.instrumentation_mode"),
    ("triton", "knobs.runtime.debug"),
    ("triton", "knobs.nvidia.cuobjdump"),
)


def missing_private_api() -> str | None:
    """None if this Triton has every private piece the compiler-informed pruning uses, else which
    are missing (e.g. on triton 3.4: ``JITFunction._pack_args``)."""
    import importlib

    missing = []
    for module, path in PRIVATE_API:
        try:
            obj = importlib.import_module(module)
            for name in path.split("."):
                obj = getattr(obj, name)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{path}")
    return ", ".join(missing) or None


# Why the compiler-informed pruning is off in this process (None: it is on); warned once.
_pruning_off: list[str] = []


def _turn_pruning_off(reason: str) -> None:
    if not _pruning_off:
        _pruning_off.append(reason)
        import triton

        warnings.warn(
            f"fastlora: compiler-informed pruning of Triton configs is off ({reason}; triton "
            f"{getattr(triton, '__version__', '?')}); configs are pruned by their size alone, so the autotuner may "
            "time some that spill. fastlora is checked with triton 3.6 and 3.8.",
            RuntimeWarning,
            stacklevel=3,
        )


def target_of(capability: tuple[int, int]):
    """The Triton target of a CUDA GPU of ``capability`` (9, 0 compiles for sm_90a)."""
    from triton.backends.compiler import GPUTarget

    major, minor = capability
    return GPUTarget("cuda", 10 * major + minor, 32)


@functools.cache
def _binder(kernel, target):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialise(kernel, target, args: tuple, kwargs: dict) -> Specialisation:
    """How the JIT would specialise ``kernel[grid](*args, **kwargs)`` (``kwargs`` with the constexprs
    and ``num_warps``-style options) on ``target``. ``args`` may be CPU tensors: only their dtype and
    the alignment of their data pointer are read."""
    from triton import knobs

    backend, binder = _binder(kernel, target)
    # JITFunction.run takes grid and warmup itself (an autotuner's pruning is handed them), and adds
    # two options before binding, which are part of the compile's cache key.
    kwargs = {
        **{k: v for k, v in kwargs.items() if k not in ("grid", "warmup")},
        "debug": kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
        "instrumentation_mode": knobs.compilation.instrumentation_mode,
    }
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return Specialisation(signature, constexprs, attrs, options)


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def cuobjdump(path: str, *flags: str) -> str:
    """The output of the ``cuobjdump`` that ships with Triton on a cubin or a library holding cubins."""
    done = subprocess.run([_tool("cuobjdump"), *flags, path], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} {path} failed: {done.stderr.strip()}")
    return done.stdout


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def read_resources(cubin: bytes, dynamic_shared: int) -> Resources:
    """Registers and stack of the one kernel in ``cubin`` (``cuobjdump -res-usage``); ``dynamic_shared``
    is what Triton allocates at launch (its metadata's ``shared``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        match = _RES_USAGE.search(cuobjdump(f.name, "-res-usage"))
    if match is None:
        raise RuntimeError("cuobjdump -res-usage printed no REG/STACK line")
    registers, stack, static_shared, local = map(int, match.groups())
    return Resources(registers, stack + local, dynamic_shared + static_shared)


# Every compile of this process, by kernel, target and specialisation: the pruner and inspect share it.
_COMPILED: dict[tuple, Compiled] = {}


def _memo_key(kernel, target, spec: Specialisation) -> tuple:
    return (kernel.fn.__module__, kernel.fn.__qualname__, target.arch, spec.key())


def compiled_already(kernel, target, spec: Specialisation) -> Compiled | None:
    """The compile of ``spec`` this process has made, if any (``compile_for`` makes one)."""
    return _COMPILED.get(_memo_key(kernel, target, spec))


def compile_for(kernel, target, spec: Specialisation) -> Compiled:
    """Compile ``kernel`` as specialised by ``spec`` for ``target`` (once per process); a compiler
    error is returned, not raised."""
    key = _memo_key(kernel, target, spec)
    if key not in _COMPILED:
        import triton
        from triton.compiler import ASTSource

        name = kernel.fn.__name__
        try:
            src = ASTSource(kernel, spec.signature, spec.constexprs, spec.attrs)
            compiled = triton.compile(src, target=target, options=spec.options.__dict__)
            cubin = compiled.asm["cubin"]
            _COMPILED[key] = Compiled(name, cubin, read_resources(cubin, compiled.metadata.shared), None)
        except Exception as err:  # the compiler's failures come as many exception types
            _COMPILED[key] = Compiled(name, None, None, f"{type(err).__name__}: {str(err).strip()[:2000]}")
    return _COMPILED[key]


def _device_of(named_args: dict) -> torch.device:
    return next((v.device for v in named_args.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))


def drop_spilling(kernel, configs: list, named_args: dict, **kwargs) -> list:
    """Of ``configs`` (``triton.Config``), those that the compiler says neither spill registers nor need
    more shared memory than the GPU of ``named_args``'s tensors offers; if none is left, the one that
    spills least (then uses the least shared memory), so that a launch always has a config.

    For an ``early_config_prune(configs, named_args, **kwargs)`` after its fast formula filter::

        return drop_spilling(my_jit_kernel, kept, named_args, **kwargs)

    ``kernel`` is the ``@triton.jit`` function the autotuner wraps. The target is that of
    ``device_limits`` (``fastlora inspect`` stands in sm_90a or sm_80 there). Each config is compiled
    once a process; on a GPU the launch then finds the compile in Triton's cache. A config that fails
    to compile is dropped like one that spills. Unchanged under the interpreter or with one config.
    """
    if INTERPRET or len(configs) <= 1 or _pruning_off:
        return list(configs)
    missing = missing_private_api()
    if missing is not None:
        _turn_pruning_off(f"this Triton lacks {missing}")
        return list(configs)
    limits = device_limits(_device_of(named_args))
    target = target_of(limits.capability)

    def cost(config) -> tuple[float, int]:
        compiled = compile_for(kernel, target, specialise(kernel, target, (), {**named_args, **kwargs, **config.all_kwargs()}))
        if compiled.resources is None:
            return float("inf"), 0
        stack, shared = compiled.resources.stack_bytes, compiled.resources.shared_bytes
        return stack + (shared > limits.max_shared_bytes) * 2**20, shared

    try:
        costs = {config: cost(config) for config in configs}
    except Exception as err:  # a Triton whose private binder changed: keep the formula's choice
        _turn_pruning_off(f"specialising for the compiler raised {type(err).__name__}: {err}")
        return list(configs)
    kept = [config for config in configs if costs[config][0] == 0]
    return kept or [min(configs, key=costs.__getitem__)]
