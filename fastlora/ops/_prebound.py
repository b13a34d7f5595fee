"""Pre-bound Triton launches: Triton's launch path once per launch signature, its C launcher after.

A launch ``kernel[grid](*args, **kwargs)`` through Triton runs, on the host, the autotuner's key and
cache look-up (``Autotuner.run``), then the binder (``JITFunction.run``: every argument's type and
specialisation, about 13.6 µs for the 67 arguments of ``_lora_gemm_kernel``, see the census), the
kernel-cache look-up, then the compiled kernel's C launcher. ``launch`` runs that path on a
signature's first call and keeps what it settled (the compiled kernel, the autotuner's config);
every later call with the same signature calls the C launcher (``CompiledKernel.run``) with the
argument list Triton would have passed it.

The signature (``_signature``) holds every int argument by value, every bool by value, every float
by its type (Triton does not specialise on a float's value), every tensor by dtype and whether its
address is 16-byte aligned, every keyword (the constexprs) by value, the device and Triton's
options that enter its cache key (``debug``, the instrumentation mode). That is a superset of what
Triton's binder specialises on (an int's ``== 1`` and ``% 16`` and width, a pointer's ``% 16``,
dtypes) and of the autotuners' keys, so two calls with one signature run the same compiled kernel
with the same config. Two kinds of ints count by less than their value:

- ``do_not_specialize`` parameters (the dropout seed, new every call): by width (i32, i64, u64),
  which is all the binder reads of them;
- the call site's ``free`` parameters: by ``== 1``, ``% 16`` and width, which is all the binder
  reads of them. A call site names as free the ints that change with the number of rows (M, a row
  offset, rows per split) and that neither an autotuner key nor its constexprs depend on, so that
  training on varying sequence lengths reuses one plan: the grid, which does depend on them, is
  computed on every call from the plan's config (``grid(meta)``).

An argument of any other type (a host tensor descriptor, a SymInt) gives no signature: the call
takes Triton's path every time.

A plan is made only where the launch protocol is the one read in Triton 3.6-3.8's sources
(``_PROTOCOL_VERSIONS``; ``JITFunction.run`` binds, then calls ``CompiledKernel.run(grid0, grid1,
grid2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *bound)``), no
hook that Triton's path would run is set (``jit.pre_run_hooks``, a config's ``pre_hook``, the
stages-inspection hook), and Triton's own binder, run once on the first call's arguments, binds
exactly the argument list the plan will pass (``_bound_as_triton``). Anything else keeps Triton's
own path. Under ``TRITON_INTERPRET=1`` the launchers return no compiled kernel, so nothing is
planned and the interpreter runs every call.

What a pre-bound call keeps from Triton's path: the current stream of the current device (read per
call, so CUDA-graph capture and user streams work as with Triton; ``on_device`` makes the tensors'
device current), the launch hooks (``knobs.runtime.launch_enter_hook`` / ``exit_hook``, read per
call, so a profiler attached later still sees every launch), the launcher's scratch allocation
(``CudaLauncher`` reads Triton's allocator on the calling thread, which ``on_device`` sets). What it
drops: Triton's check that a global a kernel read has not changed since it compiled (it raises in
development only; ``clear()`` after changing one), and autotuning of a signature already planned
(the config is the one chosen on its first call, as Triton's cache would give).
``FASTLORA_PREBOUND=0`` turns it off (every call through Triton).

Thread safety: plans are made and used under ``on_device``'s launch lock (every launch of this
package is inside it); a plan holds no per-call state.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
import warnings

import torch

# Off under the interpreter: its launches return no compiled kernel, so there is nothing to keep.
ENABLED = os.environ.get("FASTLORA_PREBOUND", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"

# The Triton releases whose launch protocol this module was written against (their sources read).
_PROTOCOL_VERSIONS = ("3.6.", "3.7.", "3.8.")

# Verify every keyed call site's promise (``launch_keyed``) on each planned call: for the tests.
CHECK = os.environ.get("FASTLORA_PREBOUND_CHECK") == "1"

_plans: dict = {}  # signature -> _Plan, or _NO_PLAN for a signature that cannot be planned
# (Also _host_programs._TABLE -> the host programs' own table: cleared and swapped with the plans.)
# The host program being recorded on this thread, if any (``_host_programs``): .active
_NO_PLAN = False
_recording = threading.local()
# A bound on the plans kept: a signature includes the int arguments that are not free, so a call
# site whose such int took a new value every call would otherwise grow the table without end. When
# it is full, it is emptied (plans are remade on their next call) and a warning says so once.
_MAX_PLANS = 4096
_warned: set = set()
_lock = threading.Lock()


def _width(v: int) -> int:
    """How the binder types an int: 0 i32, 1 i64, 2 u64."""
    return 0 if -(2**31) <= v < 2**31 else 1 if -(2**63) <= v < 2**63 else 2


def _signature(launcher, device: torch.device, extra, args, classed):
    """The launch's signature (see the module docstring), or None if an argument has no key.

    Built from the arguments' types first (``map(type, args)`` runs in C): a call site passes the
    same types every call, so the positions of its ints and tensors come from a table (``_layout``)
    and are read with ``itemgetter``: about 3-5 µs for the 56 arguments of ``_lora_gemm_kernel``."""
    types = tuple(map(type, args))
    layout = _layouts.get((types, classed))
    if layout is None:
        layout = _layout(types, classed)
    if not layout:
        return None
    ints, tensors, unspecialised, free = layout
    try:
        tensor_key = tuple([(t.dtype, not t.data_ptr() & 15) for t in tensors(args)])
    except RuntimeError:  # no storage (a meta or fake tensor): nothing to launch on
        return None
    classes = ()
    if unspecialised is not None:
        classes = tuple([_width(v) for v in unspecialised(args)])
    if free is not None:
        classes += tuple([(v == 1, not v % 16, _width(v)) for v in free(args)])
    return (id(launcher), device, extra, types, ints(args), tensor_key, classes)


_layouts: dict = {}  # (argument types, classed positions) -> getters, or False (no signature)


def _getter(positions):
    """A function of ``args`` returning the tuple of ``args[i]`` for ``i`` in ``positions``."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        (i,) = positions
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def _layout(types: tuple, classed: tuple):
    """For the call sites that pass arguments of ``types``: where their ints keyed by value (with
    bools), tensors, ``do_not_specialize`` ints and free ints are. False if an argument's type has
    no key (floats count by type alone, and ``types`` is part of the signature)."""
    nospec, free = classed
    ints, tensors, unspecialised, loose = [], [], [], []
    layout = False
    for i, kind in enumerate(types):
        if kind is int:
            (unspecialised if i in nospec else loose if i in free else ints).append(i)
        elif kind is bool:
            ints.append(i)
        elif kind is float:
            pass
        elif issubclass(kind, torch.Tensor):
            tensors.append(i)
        else:
            break
    else:
        layout = (_getter(ints), _getter(tensors), _getter(unspecialised) if unspecialised else None,
                  _getter(loose) if loose else None)  # fmt: skip
    _layouts[(types, classed)] = layout
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
    """One signature's launch: the compiled kernel's C launcher, the config's constexprs (``meta``, for
    a grid function) and the constexpr tail of the arguments. Holds the compiled kernel, so its module
    stays loaded."""

    __slots__ = ("kernel", "launcher", "function", "packed", "meta", "tail", "get_stream", "device_index",
                 "runtime", "generic")  # fmt: skip

    def __init__(self, kernel, meta, tail, get_stream, device_index):
        from triton import knobs

        if hasattr(kernel, "_init_handles"):
            kernel._init_handles()  # loads the module on the device (done already: Triton launched it)
        self.kernel, self.meta, self.tail = kernel, meta, tail
        # CompiledKernel.run is a property that re-checks the handles: read once.
        self.launcher, self.function, self.packed = kernel.run, kernel.function, kernel.packed_metadata
        self.get_stream, self.device_index = get_stream, device_index
        self.runtime = knobs.runtime  # its hooks are read per call (a profiler may attach later)
        self.generic = None  # launch_keyed's check: the generic signature it was made for

    def __call__(self, args, grid):
        if callable(grid):
            grid = grid(self.meta)
        size = len(grid)
        g0, g1, g2 = grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1
        runtime = self.runtime
        stream = self.get_stream(self.device_index)
        full = (*args, *self.tail)
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        # No hook: None, or an empty HookChain (triton 3.6-3.8's hook type); anything else is a hook.
        no_enter = enter is None or getattr(enter, "calls", None) == []
        if no_enter and (leave is None or getattr(leave, "calls", None) == []):
            # Nothing to call: the C launcher skips None hooks, and the metadata (a LazyDict that
            # JITFunction.run builds on every call, 1-2 µs) would be read by nobody.
            enter = leave = metadata = None
        else:  # as JITFunction.run: the metadata from the grid as given
            metadata = self.kernel.launch_metadata(grid, stream, *full)
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
    """``(get_stream, index)``: Triton's current-stream query and ``device``'s index (``on_device``
    has made it the current device). The launch sites pass ``tensor.device``, which has its index:
    a bare ``cuda`` would key plans of several devices alike."""
    from triton.runtime.driver import driver

    if device.index is None:
        raise ValueError("pre-bound launches need a device with its index (tensor.device)")
    return driver.active.get_current_stream, device.index


def _protocol_known(jit, config) -> bool:
    """Is this Triton's launch path the one a plan reproduces: a release whose sources were read,
    and no hook that Triton's path would run on every call?"""
    import triton
    from triton import knobs

    if not triton.__version__.startswith(_PROTOCOL_VERSIONS):
        return False
    if getattr(jit, "pre_run_hooks", None):
        return False
    if config is not None and getattr(config, "pre_hook", None) is not None:
        return False
    return getattr(knobs.runtime, "add_stages_inspection_hook", None) is None


_knobs: list = []


def _triton_options():
    """Triton's process-wide options that enter its kernel cache key (part of every signature). Read
    per call (Triton reads them per launch too: they come from the environment); the module is
    imported once (an import statement per launch cost ~0.5 µs)."""
    if not _knobs:
        from triton import knobs

        _knobs.append(knobs)
    knobs = _knobs[0]
    return (knobs.runtime.debug, getattr(knobs.compilation, "instrumentation_mode", None))


# The GPU-only pieces, which the census and the tests stand in on the CPU
# (``fastlora.inspect.recording.stubbed_launches``).
binder_of = _device_binder
current_stream_getter = _current_stream_getter
protocol_known = _protocol_known


def _make_plan(launcher, jit, kernel, args, kwargs, device):
    """A ``_Plan`` for the launch Triton just made (``kernel`` is what it returned), or None."""
    if not (hasattr(kernel, "run") and hasattr(kernel, "packed_metadata") and hasattr(kernel, "function")):
        return None  # the interpreter, or an unknown launch protocol
    config = getattr(launcher, "best_config", None) if launcher is not jit else None
    if not protocol_known(jit, config):
        return None
    call_kwargs = {**kwargs, **(config.all_kwargs() if config is not None else {})}
    meta = {**kwargs, **(config.kwargs if config is not None else {})}
    if len(args) > len(jit.params):
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
    get_stream, index = current_stream_getter(device)
    # meta: the constexprs only (what a grid function may read). Never the arguments themselves: a
    # plan lives for the process, and holding the first call's tensors would keep them allocated.
    return _Plan(kernel, meta, tuple(tail), get_stream, index)


def launch(launcher, grid, args: tuple, kwargs: dict, device: torch.device, free: tuple = ()):
    """``launcher[grid](*args, **kwargs)``, pre-bound after a signature's first call (see the module
    docstring). ``launcher``: a ``triton.autotune``-d or ``triton.jit`` kernel (or anything indexable
    by a grid, e.g. a test's spy, which then runs every call). ``grid``: a tuple, or a function of the
    launch's constexprs (``meta``), evaluated on every call. ``free``: names of int parameters keyed
    by their specialisation only (see the module docstring). Call inside ``on_device(device)``.
    Returns what the launch returned (Triton: the compiled kernel; the interpreter: None)."""
    return launch_lazy(launcher, grid, args, tuple(kwargs.items()), lambda: kwargs, device, free)


def launch_lazy(launcher, grid, args: tuple, setup_key, setup, device: torch.device, free: tuple = ()):
    """``launch`` for a call site whose constexprs take work to derive: ``setup()`` returns the
    keyword arguments and runs only when the launch's signature has no plan. The signature is the
    arguments' (``_signature``) with ``setup_key`` (hashable): ``setup()``'s result must be a function
    of those alone (the arguments' ints other than the free ones, dtypes and alignments, and
    ``setup_key``), which is what lets a planned call skip it."""
    jit, classed = _jit_of(launcher, free)[1:3] if ENABLED else (None, None)
    recorder = getattr(_recording, "active", None)
    if recorder is not None:  # host programs replay keyed launches only
        recorder.fail(permanent=True)
    signature = None
    if jit is not None:
        signature = _signature(launcher, device, (setup_key, _triton_options()), args, classed)
        plan = _plans.get(signature) if signature is not None else None
        if plan:
            return plan(args, grid)
    kwargs = setup()
    kernel = launcher[grid](*args, **kwargs)
    if signature is not None and signature not in _plans:
        _remember(signature, launcher, jit, kernel, args, kwargs, device)
    return kernel


def launch_keyed(launcher, grid, args: tuple, key, tensors: tuple, setup, device: torch.device, free: tuple = ()):
    """``launch_lazy`` for a hot call site that states its signature itself, skipping the generic one
    (``_signature``: 7 µs for ``_lora_gemm_kernel``'s 44 arguments, against about 2 µs for this one,
    census host path, quiet CPU). The site's promise, checked when ``FASTLORA_PREBOUND_CHECK=1`` (the
    test suite's real-site tests turn it on), is that ``key`` (hashable) together with the dtypes and
    16-byte alignments of ``tensors`` determines everything the generic signature holds but the free
    ints and the ``do_not_specialize`` ones (keyed here by their classes as there):

    - every other int and bool argument by value (a site puts them in ``key``, e.g. as a slice of
      ``args``) and every float argument's type (the sites pass ``float()``s);
    - every tensor argument's dtype and alignment: ``tensors`` holds each distinct tensor of ``args``;
    - ``setup()``'s result, as for ``launch_lazy``.

    With the check on, a planned call also computes the generic signature and raises if it is not the
    one its plan was made for (a key that misses something a kernel specialises on)."""
    if not ENABLED:
        return launch_lazy(launcher, grid, args, key, setup, device, free)
    found = _jit_of(launcher, free)
    recorder = getattr(_recording, "active", None)
    if found[1] is None:  # not a Triton kernel (a test's spy): every call runs it, and none is replayed
        if recorder is not None:
            recorder.fail(permanent=True)
        return launcher[grid](*args, **setup())
    accel = _accelerated()
    if accel is not None and recorder is None and not CHECK:  # the same steps in C (csrc/host/prebound.c)
        launched, signature = accel.launch(
            _plans, ("keyed", found[7], device), key, _triton_options(), tensors, args, found[5], found[6], grid,
            _knobs[0].runtime,
        )  # fmt: skip
        if launched:
            return signature  # (the kernel)
    else:  # in Python: the check, and a host program's recording (_host_programs), need the plan itself
        signature = _keyed_signature(launcher, device, key, args, tensors, found)
        plan = _plans.get(signature) if signature is not None else None
        if plan:
            if CHECK:
                _check_keyed(plan, launcher, device, key, args, tensors, found)
            if recorder is not None:
                recorder.step(plan, grid, args, found[5])
            return plan(args, grid)
        if recorder is not None:
            # A launch through Triton: its first call (nothing to replay yet), or one that is never
            # planned (_NO_PLAN: an unknown launch protocol, a hook), which no later call replays either.
            recorder.fail(permanent=plan is _NO_PLAN)
    return _first_call(launcher, grid, args, key, setup, device, found, signature)


def _first_call(launcher, grid, args, key, setup, device, found, signature):
    """A keyed launch without a plan: Triton's path, then its plan made (``launch_keyed``)."""
    kwargs = setup()
    kernel = launcher[grid](*args, **kwargs)
    if signature is not None and signature not in _plans:
        plan = _remember(signature, launcher, found[1], kernel, args, kwargs, device)
        if plan and CHECK:
            plan.generic = _generic_for_check(launcher, device, key, args, found)
    return kernel


_dtype = operator.attrgetter("dtype")
_data_ptr = operator.methodcaller("data_ptr")  # by name, as the C path (a subclass may override it)


# fastlora._prebound_c (csrc/host/prebound.c): launch_keyed's hit path in C, built with the package
# where a C compiler is there (an optional extension); FASTLORA_PREBOUND_C=0 keeps the Python path.
_ACCEL: list = []
_ACCEL_API = 1  # the API_VERSION of csrc/host/prebound.c that launch_keyed calls


def _accelerated():
    """The C module, or None (not built, turned off, or built from other sources); looked up once."""
    if not _ACCEL:
        module = None
        if os.environ.get("FASTLORA_PREBOUND_C", "1") != "0":
            try:
                from .. import _prebound_c as module
            except ImportError:
                module = None
            if module is not None and getattr(module, "API_VERSION", None) != _ACCEL_API:
                # An editable install keeps an old .so until it is rebuilt: its launch() may take
                # other arguments, so the Python path runs until then.
                warnings.warn(f"fastlora: fastlora._prebound_c is stale (API {getattr(module, 'API_VERSION', None)}, "
                              f"expected {_ACCEL_API}); rebuild it (pip install --no-build-isolation -e .). "
                              "Launches take the Python path meanwhile", stacklevel=3)  # fmt: skip
                module = None
        _ACCEL.append(module)
        _triton_options()  # (imports knobs: launch_keyed passes knobs.runtime to the C path)
    return _ACCEL[0]


def _keyed_signature(launcher, device, key, args, tensors, found):
    """``launch_keyed``'s signature, or None where a tensor has no storage (meta, fake). The C path's
    (``fastlora._prebound_c.signature``) is the same tuple."""
    nospec, loose = found[3], found[4]
    try:
        pointers = tuple(map(_data_ptr, tensors))
    except RuntimeError:
        return None
    # All aligned is the usual case (caching-allocator blocks): one bool for it, else each pointer's bit.
    aligned = True if not functools.reduce(operator.or_, pointers, 0) & 15 else tuple([not p & 15 for p in pointers])
    # As _signature's classes, with _width's usual answer (i32) inlined: a Python call per int is ~0.1 µs.
    classes = ()
    if nospec is not None:
        classes = tuple([0 if -0x80000000 <= v < 0x80000000 else _width(v) for v in nospec(args)])
    if loose is not None:
        classes += tuple([
            (v == 1, not v % 16, 0 if -0x80000000 <= v < 0x80000000 else _width(v)) for v in loose(args)
        ])  # fmt: skip
    # ("keyed", ...): never equal to a generic signature, which starts with the launcher's id. found[7]:
    # (id(launcher), free), so that two sites of one kernel with different free ints never share plans.
    return ("keyed", found[7], device, key, _triton_options(), tuple(map(_dtype, tensors)), aligned, classes)


def _generic_for_check(launcher, device, key, args, found):
    """The generic signature, with tensor subclasses (nn.Parameter) typed as plain tensors: Triton
    binds them alike, so a site may pass either without a new plan."""
    signature = _signature(launcher, device, (key, _triton_options()), args, found[2])
    if signature is None:
        return None
    types = tuple(torch.Tensor if issubclass(t, torch.Tensor) else t for t in signature[3])
    return (*signature[:3], types, *signature[4:])


def _check_keyed(plan, launcher, device, key, args, tensors, found) -> None:
    """``launch_keyed``'s check (``CHECK``): the generic signature is the plan's, and the C path's
    signature (where it is built) is the Python one."""
    accel = _accelerated()
    if accel is not None:
        ours = _keyed_signature(launcher, device, key, args, tensors, found)
        theirs = accel.signature(("keyed", found[7], device), key, _triton_options(), tensors, args, found[5], found[6])
        if ours != theirs:
            raise AssertionError(f"fastlora: the C signature {theirs} is not the Python one {ours}")
    generic = _generic_for_check(launcher, device, key, args, found)
    if plan.generic is None:  # planned before the check was turned on
        plan.generic = generic
    elif generic != plan.generic:
        raise AssertionError(
            f"fastlora: the call site's key of a {getattr(found[1], '__name__', launcher)} launch misses something "
            "the generic signature holds (two launches with one key but different arguments' signatures)"
        )


def _remember(signature, launcher, jit, kernel, args, kwargs, device):
    """Make (or fail to make) the plan of a launch Triton just made, and keep it under ``signature``."""
    name = getattr(jit, "__name__", None) or getattr(getattr(jit, "fn", None), "__name__", repr(jit))
    if len(_plans) >= _MAX_PLANS:
        _warn_once("the plan table", f"{_MAX_PLANS} launch signatures: emptied, plans are remade as called")
        _plans.clear()
    try:
        plan = _make_plan(launcher, jit, kernel, args, kwargs, device)
    except Exception as err:  # Triton's private launch protocol changed: keep its own path
        plan = None
        _warn_once(name, f"{type(err).__name__}: {err}")
    _plans[signature] = plan if plan is not None else _NO_PLAN
    return plan


def _warn_once(name: str, why: str) -> None:
    with _lock:
        if name in _warned:
            return
        _warned.add(name)
    warnings.warn(f"fastlora: launches of {name} are not pre-bound ({why}); they take Triton's launch path "
                  "(correct, slower on the host)", stacklevel=3)  # fmt: skip


_jit_cache: dict = {}  # (id(launcher), free) -> (launcher, JITFunction or None, classed positions, getters)


def _jit_of(launcher, free: tuple):
    """``(launcher, jit, (do_not_specialize positions, free positions), nospec getter, free getter,
    nospec positions, free positions, (id(launcher), free))`` of a launcher (the getters None where
    there are no such parameters; the positions as sorted tuples), looked up by identity: hashing a
    JITFunction hashes its source (``cache_key``), about 2 µs."""
    found = _jit_cache.get((id(launcher), free))
    if found is None or found[0] is not launcher:
        jit = _jit_function(launcher)
        classed = (frozenset(), frozenset())
        if jit is not None:
            unknown = set(free) - set(jit.arg_names)
            if unknown:
                raise ValueError(f"free parameters {sorted(unknown)} are not parameters of {jit}")
            classed = (_nospec(jit), frozenset(jit.arg_names.index(name) for name in free))
        nospec, loose = (tuple(sorted(positions)) for positions in classed)
        found = _jit_cache[(id(launcher), free)] = (
            launcher, jit, classed, _getter(nospec) if nospec else None, _getter(loose) if loose else None,
            nospec, loose, (id(launcher), free),
        )  # fmt: skip
    return found


def clear() -> None:
    """Forget every plan (the tests; a user who changed a kernel's globals)."""
    _plans.clear()
    _warned.clear()
