"""Pre-bound Triton launches: Triton's launch path once per launch signature, its C launcher after.

A launch ``kernel[grid](*args, **kwargs)`` through Triton runs, on the host, the autotuner's key and
cache look-up (``Autotuner.run``), then the binder (``JITFunction.run``: every argument's type and
specialisation, about 13.6 µs for the 67 arguments of ``_lora_gemm_kernel``, see the census), the
kernel-cache look-up, then the compiled kernel's C launcher. ``launch(launcher, grid, args, kwargs)``
runs that path on a signature's first call and keeps what it settled (the compiled kernel, the
autotuner's config, the grid); every later call with the same signature calls the C launcher
(``CompiledKernel.run``) with the same argument list Triton would have passed it.

The signature (``_signature``) holds every int argument by value, every bool by value, every float
by its type (Triton does not specialise on a float's value), every tensor by dtype and whether its
address is 16-byte aligned, every keyword (the constexprs) by value, the grid (or, for a grid
function, the device's limits, on which our grid functions depend beside the arguments), and the
device. That is a superset of what Triton's binder specialises on (an int's ``== 1`` and ``% 16``,
a pointer's ``% 16``, dtypes) and of the autotuners' keys, so two calls with one signature run the
same compiled kernel with the same config and grid. Ints of parameters marked ``do_not_specialize``
(the dropout seed, new every call) count by their width only (i32 or i64), as the binder types them.
An argument of any other type (a host tensor descriptor, a SymInt) gives no signature: the call
takes Triton's path every time.

A plan is made only when Triton's own binder, run once on the first call's arguments, binds exactly
the argument list the plan will pass (``_bound_as_triton``): a Triton whose launch protocol differs
from 3.6-3.8's makes no plan and keeps working through its own path. Under ``TRITON_INTERPRET=1``
the launchers return no compiled kernel, so nothing is planned and the interpreter runs every call.

What a pre-bound call keeps from Triton's path: the current stream of the current device (read per
call, so CUDA-graph capture and user streams work as with Triton; ``on_device`` makes the tensors'
device current), the launch hooks (``knobs.runtime.launch_enter_hook`` / ``exit_hook``, read per
call, so a profiler attached later still sees every launch). What it drops: Triton's check that a
global a kernel read has not changed since it compiled (it raises in development only), and
autotuning of a signature already planned (the config is the one chosen on its first call, as
Triton's cache would give). ``FASTLORA_PREBOUND=0`` turns it off (every call through Triton).

Thread safety: plans are made and used under ``on_device``'s launch lock (every launch of this
package is inside it); a plan holds no per-call state.
"""

from __future__ import annotations

import operator
import os
import threading
import warnings

import torch

# Off under the interpreter: its launches return no compiled kernel, so there is nothing to keep.
ENABLED = os.environ.get("FASTLORA_PREBOUND", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"

_I32 = (-(2**31), 2**31)
_plans: dict = {}  # signature -> _Plan, or _NO_PLAN for a signature that cannot be planned
_NO_PLAN = False
# A bound on the plans kept: a signature includes every int argument, so a kernel whose int
# argument took a new value on every call (a seed not marked do_not_specialize) would otherwise grow
# the table without end. Past it, new signatures take Triton's path (and a warning says why).
_MAX_PLANS = 4096
_warned: set = set()
_lock = threading.Lock()


def _signature(launcher, device: torch.device, extra, args, nospec):
    """The launch's signature (see the module docstring), or None if an argument has no key.

    Built from the arguments' types first (``map(type, args)`` runs in C): a call site passes the
    same types every call, so the positions of its ints and tensors come from a table (``_layout``)
    and are read with ``itemgetter``. About 3 µs for the 56 arguments of ``_lora_gemm_kernel`` against
    5.7 for a per-argument loop (this machine, 2026-12-02)."""
    types = tuple(map(type, args))
    layout = _layouts.get((types, nospec))
    if layout is None:
        layout = _layout(types, nospec)
        if layout is None:
            return None
    ints, tensors, widths = layout
    try:
        tensor_key = tuple([(t.dtype, not t.data_ptr() & 15) for t in tensors(args)])
    except RuntimeError:  # no storage (a meta or fake tensor): nothing to launch on
        return None
    width_key = tuple([_I32[0] <= v < _I32[1] for v in widths(args)]) if widths is not None else ()
    return (id(launcher), device, extra, types, ints(args), tensor_key, width_key)


_layouts: dict = {}  # argument types -> (ints getter, tensors getter, do_not_specialize ints getter)


def _getter(positions):
    """A function of ``args`` returning the tuple of ``args[i]`` for ``i`` in ``positions``."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        (i,) = positions
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def _layout(types: tuple, nospec: frozenset):
    """For the call sites that pass arguments of ``types``: where their keyed ints (with bools: by
    value), tensors and ``do_not_specialize`` ints (by width) are. None if an argument's type has no
    key (floats count by type alone, and ``types`` is part of the signature)."""
    ints, tensors, widths = [], [], []
    for i, kind in enumerate(types):
        if kind is int:
            (widths if i in nospec else ints).append(i)
        elif kind is bool:
            ints.append(i)
        elif kind is float:
            pass
        elif issubclass(kind, torch.Tensor):
            tensors.append(i)
        else:
            return None
    layout = (_getter(ints), _getter(tensors), _getter(widths) if widths else None)
    _layouts[(types, nospec)] = layout
    return layout


def _jit_function(launcher):
    """The ``JITFunction`` under an autotuner (or the launcher itself), or None."""
    fn = launcher
    for _ in range(4):
        if hasattr(fn, "arg_names") and hasattr(fn, "params") and not hasattr(fn, "configs"):
            return fn
        fn = getattr(fn, "fn", None)
        if fn is None:
            return None
    return None


def _nospec(jit) -> frozenset:
    """Positions of the ``do_not_specialize`` parameters."""
    return frozenset(p.num for p in jit.params if getattr(p, "do_not_specialize", False))


class _Plan:
    """One signature's launch: the compiled kernel's C launcher, its grid and the constexpr tail of
    the arguments. Holds the compiled kernel, so its module stays loaded."""

    __slots__ = ("kernel", "launcher", "function", "packed", "grid", "tail", "get_stream", "device_index", "runtime")

    def __init__(self, kernel, grid, tail, get_stream, device_index):
        from triton import knobs

        if hasattr(kernel, "_init_handles"):
            kernel._init_handles()  # loads the module on the device (done already: Triton launched it)
        self.kernel, self.grid, self.tail = kernel, grid, tail
        # CompiledKernel.run is a property that re-checks the handles: read once.
        self.launcher, self.function, self.packed = kernel.run, kernel.function, kernel.packed_metadata
        self.get_stream, self.device_index = get_stream, device_index
        self.runtime = knobs.runtime  # its hooks are read per call (a profiler may attach later)

    def __call__(self, args):
        (g0, g1, g2), runtime = self.grid, self.runtime
        stream = self.get_stream(self.device_index)
        full = (*args, *self.tail)
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        metadata = self.kernel.launch_metadata(self.grid, stream, *full) if enter is not None else None
        self.launcher(g0, g1, g2, stream, self.function, self.packed, metadata, enter, leave, *full)
        return self.kernel


def _bound_as_triton(jit, args, call_kwargs, full) -> bool:
    """Does Triton's binder bind ``args`` + ``call_kwargs`` to exactly ``full`` (the list a plan passes
    to the C launcher)? Its binder is private: any failure to run it means no plan."""
    from triton import knobs

    options = {"debug": jit.debug or knobs.runtime.debug,
               "instrumentation_mode": knobs.compilation.instrumentation_mode}  # fmt: skip
    bound = binder_of(jit)(*args, **call_kwargs, **options)[0]
    values = list(bound.values())
    return len(values) == len(full) and all(v is f or (type(v) is type(f) and v == f) for v, f in zip(values, full))


def _device_binder(jit):
    """The binder Triton's ``JITFunction.run`` uses on the current device (private: 3.6-3.8 keep it
    last in ``device_caches[device]``)."""
    from triton.runtime.driver import driver

    return jit.device_caches[driver.active.get_current_device()][-1]


def _current_stream_getter(device: torch.device):
    """``(get_stream, index)``: Triton's current-stream query and the current device's index, which
    ``on_device`` has made ``device``."""
    from triton.runtime.driver import driver

    return driver.active.get_current_stream, torch.cuda.current_device()


# The two GPU-only pieces, which the census and the tests stand in on the CPU
# (``fastlora.inspect.recording.stubbed_launches``).
binder_of = _device_binder
current_stream_getter = _current_stream_getter


def _make_plan(launcher, jit, kernel, grid, args, kwargs, device):
    """A ``_Plan`` for the launch Triton just made (``kernel`` is what it returned), or None."""
    if not (hasattr(kernel, "run") and hasattr(kernel, "packed_metadata") and hasattr(kernel, "function")):
        return None  # the interpreter, or an unknown launch protocol
    config = getattr(launcher, "best_config", None) if launcher is not jit else None
    call_kwargs = {**kwargs, **(config.all_kwargs() if config is not None else {})}
    meta = {**kwargs, **(config.kwargs if config is not None else {})}
    names = jit.arg_names
    if len(args) > len(names):
        return None
    tail = []
    for param in jit.params[len(args):]:
        name = param.name
        if name in meta:
            tail.append(meta[name])
        elif param._param.default is not param._param.empty:
            tail.append(param._param.default)
        else:
            return None
    full = (*args, *tail)
    if not _bound_as_triton(jit, args, call_kwargs, full):
        return None
    if callable(grid):
        grid = grid(dict(zip(names, full)))
    grid = tuple(grid) + (1,) * (3 - len(grid))
    get_stream, index = current_stream_getter(device)
    return _Plan(kernel, grid, tuple(tail), get_stream, index)


def launch(launcher, grid, args: tuple, kwargs: dict, device: torch.device, limits):
    """``launcher[grid](*args, **kwargs)``, pre-bound after a signature's first call (see the module
    docstring). ``launcher``: a ``triton.autotune``-d or ``triton.jit`` kernel (or anything indexable
    by a grid, e.g. a test's spy, which then runs every call). ``grid``: a tuple, or a function of the
    launch's arguments and constexprs that depends on nothing else but ``limits`` (the
    ``device_limits`` of ``device``). Call inside ``on_device(device)``. Returns what the launch
    returned (Triton: the compiled kernel; the interpreter: None)."""
    extra = (limits if callable(grid) else tuple(grid), tuple(kwargs.items()))
    return launch_lazy(launcher, args, extra, lambda: (grid, kwargs), device, limits)


def launch_lazy(launcher, args: tuple, setup_key, setup, device: torch.device, limits):
    """``launch`` for a call site whose grid and constexprs take work to derive: ``setup()`` returns
    ``(grid, kwargs)`` and runs only when the launch's signature has no plan. The signature is the
    arguments' (``_signature``) with ``setup_key`` (hashable) and ``limits``: ``setup()``'s result
    must be a function of those alone (the arguments' ints, dtypes and alignments, ``setup_key``,
    ``limits``), which is what lets a planned call skip it."""
    jit, nospec = _jit_of(launcher) if ENABLED else (None, None)
    signature = None
    if jit is not None:
        signature = _signature(launcher, device, (limits, setup_key), args, nospec)
        plan = _plans.get(signature) if signature is not None else None
        if plan:
            return plan(args)
    grid, kwargs = setup()
    kernel = launcher[grid](*args, **kwargs)
    if signature is not None and signature not in _plans:
        name = getattr(jit, "__name__", None) or getattr(getattr(jit, "fn", None), "__name__", repr(jit))
        if len(_plans) >= _MAX_PLANS:
            _warn_once(name, f"more than {_MAX_PLANS} launch signatures")
            return kernel
        try:
            plan = _make_plan(launcher, jit, kernel, grid, args, kwargs, device)
        except Exception as err:  # Triton's private launch protocol changed: keep its own path
            plan = None
            _warn_once(name, f"{type(err).__name__}: {err}")
        _plans[signature] = plan if plan is not None else _NO_PLAN
    return kernel


def _warn_once(name: str, why: str) -> None:
    with _lock:
        if name in _warned:
            return
        _warned.add(name)
    warnings.warn(f"fastlora: launches of {name} are not pre-bound ({why}); they take Triton's launch path "
                  "(correct, slower on the host)", stacklevel=3)  # fmt: skip


_jit_cache: dict = {}  # id(launcher) -> (launcher, its JITFunction or None, do_not_specialize positions)


def _jit_of(launcher):
    """``(jit, nospec)`` of a launcher, looked up by identity: hashing a JITFunction hashes its
    source (``cache_key``), about 2 µs."""
    found = _jit_cache.get(id(launcher))
    if found is None or found[0] is not launcher:
        jit = _jit_function(launcher)
        found = _jit_cache[id(launcher)] = (launcher, jit, _nospec(jit) if jit is not None else frozenset())
    return found[1], found[2]


def clear() -> None:
    """Forget every plan (the tests; a user who changed a kernel's globals)."""
    _plans.clear()
    _warned.clear()
