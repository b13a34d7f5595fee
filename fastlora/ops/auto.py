"""``backend="auto"``: the backend that measured fastest on this GPU for this problem, among those
that computed it correctly, remembered.

A *problem class* is the GPU's name, ``x``'s dtype, the adapters' dtype, M rounded up to a power of
two, K, N, r, dropout on or off, and whether gradients are needed. On the first call of a class,
``choose`` runs every backend that can run it (``"torch"`` always among them) on scratch tensors of
the call's shapes, dtypes and strides through the correctness gate (``fastlora.ops.gate``): each
one's outputs, and gradients when gradients are needed, are compared with the torch backend's by
the tolerance table; a backend that differs, gives NaN/inf, raises or exceeds the deadline is
excluded for the class, with one warning and its reason in ``explain_backend``. The rest are timed
(forward, plus backward when gradients are needed, after two warm-up runs that let each backend
autotune, then ``REPS`` runs timed with CUDA events); the median wins. The choice is kept in memory
and in the autotune cache file (``fastlora.ops.autotune_cache``), so a new process does not measure
again; a measurement in which a failure may be transient (out of memory, a timeout) is kept in
memory only.

Measuring leaves the caller's state alone: scratch tensors (seeded from a private generator; a
frozen weight, which every backend only reads, is used in place), generators restored, autocast
off, and outside the caller's saved-tensor hooks and dispatch modes (so inside
``checkpoint(use_reentrant=False)`` the scratch backward recomputes nothing of the caller's); the
autograd graph is built on the scratch tensors only. Two threads whose first calls coincide measure
once (one lock) and agree; a thread that reaches ``choose`` again while it measures, or a backward
pass that would wait on another thread's measurement, runs ``"torch"`` for that call, unsettled.

What is chosen without measuring, in this order:

1. a pin: ``fastlora.set_default_backend(name)``, else ``FASTLORA_BACKEND=torch|triton|cuda`` (read
   at the first ``"auto"`` call of the process), is used as if passed as ``backend=`` (a backend
   that cannot run the call raises, naming why);
2. CPU tensors (and any non-CUDA device): ``"torch"``;
3. ``torch.compile`` tracing: ``"torch"``, which the compiled graph keeps (the choice is made when
   the graph is traced, and timing cannot run there). To compile a fused backend, pin it;
4. ``torch.use_deterministic_algorithms(True)``: ``"torch"``, a fixed choice (a measured one could
   change between runs as the cache fills);
5. no fused backend can run the call (dtype, r > 256, not installed, GPU too old): ``"torch"``;
6. CUDA-graph capture (``torch.cuda.is_current_stream_capturing()``): the cached choice if that
   backend has already run the class in this process (else it would autotune inside the capture),
   otherwise ``"torch"`` for that call, unsettled (a capture cannot run a measurement either).

Distributed: each rank measures on its own GPU; ranks are not made to agree (a broadcast would be a
collective inside the first forward of each problem class, and ranks whose batches fall in different
M buckets would wait on each other forever). The backends agree within the tolerance table, so mixed
choices change rounding, not results; pin a backend where ranks must run identical kernels.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from typing import Callable

import torch

from . import gate
from .autotune_cache import CACHE_FORMAT, cache_path, doctor_failures, environment_key, read_disk, write_disk  # noqa: F401
from .candidates import dense_candidates
from .gate import REPS, WARMUP, Candidate, Failure, Timer, cuda_event_timer  # noqa: F401
from .registry import BACKEND_NAMES, FUSED_BACKENDS, cannot_run

_PIN_NAMES = ("torch", "triton", "cuda")
# Devices whose tensors are measured; others run "torch". The CPU tests add "cpu", with fake backends.
TIMED_DEVICE_TYPES = ("cuda",)

_timer: Timer = cuda_event_timer
_pinned: str | None = None
_env_pin: list[str | None] = []  # FASTLORA_BACKEND, read once (os.environ.get costs µs a call)
_memory: dict[str, dict] = {}  # "env | problem key" → {"backend", "times_ms"}
_disk_read = False
_lock = threading.Lock()  # held while measuring; never re-acquired by its holder (see _owner)
_owner: int | None = None  # the thread measuring now
_warmed: set[tuple] = set()  # (env | key, backend, variant) that has run in this process
_warned: set[tuple] = set()  # (env | key, backend) whose exclusion was warned about
on_clear: list[Callable[[], None]] = []  # what modules above this one hold and clear_memory clears
_unpinned = False  # no pin of either kind (FASTLORA_BACKEND read): the fast path may run


def set_default_backend(name: str | None) -> None:
    """Pin what ``backend="auto"`` runs on to ``"torch"``, ``"triton"`` or ``"cuda"``, in this
    process; None unpins (``FASTLORA_BACKEND`` then applies, else measuring). Explicit
    ``backend=`` arguments are not affected."""
    global _pinned, _unpinned
    if name is not None and name not in _PIN_NAMES:
        raise ValueError(f"set_default_backend: name must be one of {_PIN_NAMES} or None, got {name!r}")
    _pinned = name
    _unpinned = False  # the next call rereads both pins (_pin)


def set_timer(timer: Timer | None) -> None:
    """Replace the timer (tests inject a fake one); None restores ``cuda_event_timer``."""
    global _timer
    _timer = timer or cuda_event_timer


def _pin() -> tuple[str, str] | None:
    global _unpinned
    if _pinned is not None:
        return _pinned, f"pinned by fastlora.set_default_backend({_pinned!r})"
    if not _env_pin:
        _env_pin.append(os.environ.get("FASTLORA_BACKEND"))
    env = _env_pin[0]
    if not env:
        _unpinned = True
        return None
    if env not in _PIN_NAMES:
        raise ValueError(f"FASTLORA_BACKEND must be one of {_PIN_NAMES}, got {env!r}")
    return env, f"pinned by FASTLORA_BACKEND={env}"


def problem_key(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, dropout: float, requires_grad: bool) -> str:
    """The problem class of a call, as the cache file spells it (the GPU is in the environment key)."""
    return (
        f"x={str(x.dtype).removeprefix('torch.')} adapters={str(lora_A.dtype).removeprefix('torch.')} "
        f"M<={_bucket(x)} K={x.shape[-1]} N={weight.shape[0]} r={lora_A.shape[0]} "
        f"dropout={'on' if dropout else 'off'} grad={'yes' if requires_grad else 'no'}"
    )


def _cached(env: str, key: str, candidates: list[str]) -> dict | None:
    """The remembered entry for ``key``, if its backend can still run; reads the disk file once."""
    global _disk_read
    if not _disk_read:
        _disk_read = True
        for disk_key, entry in read_disk(cache_path(), warn=True).get(env, {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("backend"), str) and isinstance(entry.get("times_ms"), dict):
                _memory.setdefault(f"{env} | {disk_key}", entry)
    entry = _memory.get(f"{env} | {key}")
    return entry if entry is not None and entry["backend"] in candidates else None


def _choice(backend: str, reason: str, times_ms: dict | None = None) -> dict:
    return {"backend": backend, "reason": reason, "times_ms": times_ms}


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (no capture without CUDA initialised)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _in_backward() -> bool:
    """Whether this thread is running a backward pass (an autograd engine task)."""
    return getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1


def _entry(results: dict, reference: str, prefer: str | None) -> tuple[dict, bool]:
    """The cache entry of a measurement, and whether it may be written to disk (nothing transient)."""
    times = {name: (r.reason if isinstance(r, Failure) else r) for name, r in results.items()}
    passed = {name: r for name, r in results.items() if not isinstance(r, Failure)}
    durable = bool(passed) and not any(isinstance(r, Failure) and r.transient for r in results.values())
    if prefer in passed:
        backend = prefer
    elif passed and all(isinstance(ms, float) for ms in passed.values()):
        backend = min(passed, key=passed.get)
    else:
        backend = reference
    return {"backend": backend, "times_ms": times}, durable


def _warn_exclusions(full: str, key: str, entry: dict) -> None:
    for name, why in entry["times_ms"].items():
        if isinstance(why, str) and name != entry["backend"] and (full, name) not in _warned:  # not the stopgap
            _warned.add((full, name))
            message = (
                f"fastlora: backend={name!r} is excluded from backend='auto' for {key}: {why}; "
                f"{entry['backend']!r} runs instead (fastlora.explain_backend shows this; pin a backend to override)"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=6)


def settle(
    device: torch.device,
    key: str,
    names: list[str],
    build: Callable[[], dict[str, Candidate]],
    *,
    reference: str = "torch",
    timed: bool = True,
    prefer: str | None = None,
    variant=None,
    runs: bool = True,
) -> tuple[dict, bool]:
    """The choice among ``names`` for problem ``key`` on ``device`` (a ``choose``-style dict), from
    the cache or from ``gate.evaluate(build(), reference, ...)``, and whether it is settled (False:
    ``reference`` as a stopgap for this call). The winner is ``prefer`` if it passes the gate, else
    the fastest that passes (``timed``), else ``reference``. ``variant`` is what, beside the class,
    makes a backend autotune afresh (e.g. a bias); ``runs``: the call will run the choice."""
    global _owner
    me = threading.get_ident()
    if _owner == me:
        return _choice(reference, f"reached again while this thread measures: {reference} for this call, unsettled"), False
    env = environment_key(device)
    full = f"{env} | {key}"
    capturing = _capturing()
    # A backward pass waiting on another thread's measurement could hold the autograd device thread
    # that measurement's own scratch backward needs: it does not wait.
    if not _lock.acquire(blocking=not _in_backward()):
        return _choice(reference, f"another thread is measuring and this is a backward pass: {reference} for this call, unsettled"), False
    try:
        entry = _cached(env, key, names)
        if entry is None and capturing:
            return _choice(reference, "CUDA-graph capture and nothing measured: the fixed choice for this call, unsettled"), False
        if entry is not None and capturing and entry["backend"] != reference and (full, entry["backend"], variant) not in _warmed:
            why = f"CUDA-graph capture: {entry['backend']} has not run {key} in this process (it would autotune in the capture)"
            return _choice(reference, f"{why}: {reference} for this call, unsettled"), False
        fresh = entry is None
        if fresh:
            _owner = me
            try:
                with gate.isolated(device):
                    try:
                        candidates = build()
                    except Exception as err:  # e.g. no memory for the scratch inputs: the call goes on
                        why = gate.failure_of(err)
                        results = {name: Failure(f"no scratch inputs ({why.reason})", why.transient) for name in names}
                    else:
                        results = gate.evaluate(candidates, reference, device, _timer if timed else None)
            finally:
                _owner = None
            entry, durable = _entry(results, reference, prefer)
            _warmed.update((full, name, variant) for name, r in results.items() if not isinstance(r, Failure))
            _memory[full] = entry
            if durable:
                write_disk(cache_path(), env, key, entry)
    finally:
        _lock.release()
    _warn_exclusions(full, key, entry)
    if runs and not capturing:
        _warmed.add((full, entry["backend"], variant))
    verb = f"passed the check against {reference} for" if prefer is not None else "measured fastest for"
    reason = f"{verb} {key}" + ("" if fresh else " (cached)")
    if all(isinstance(v, str) for v in entry["times_ms"].values()):
        reason = f"every backend failed while measured ({key}): {reference}, not cached on disk"
    excluded = [f"{name} ({why})" for name, why in entry["times_ms"].items() if isinstance(why, str)]
    if excluded:
        reason += "; excluded: " + "; ".join(excluded)
    return _choice(entry["backend"], reason, entry["times_ms"]), True


def choose(x, weight, bias, lora_A, lora_B, dropout: float, requires_grad: bool, runs: bool = True) -> dict:
    """``{"backend", "reason", "times_ms"}`` for this call under ``backend="auto"`` (see the module
    doc); measures a new problem class. ``times_ms`` maps each measured backend to its median ms,
    or why it was excluded; None where nothing was measured. ``runs``: the call runs the choice
    (False for ``explain_backend``). Treat the dict as read-only: it is shared."""
    fixed = _fixed(x, lora_A)
    if fixed is not None:
        return fixed
    fast_key = (x.shape, lora_B.shape, x.dtype, lora_A.dtype, x.get_device(), dropout, requires_grad, bias is None)
    choice = _decided.get(fast_key)
    if choice is None:
        choice, settled = _decide(x, weight, bias, lora_A, lora_B, dropout, requires_grad, runs)
        if settled and runs:  # only a call that runs its choice: under capture, _decided means "has run"
            _decided[fast_key] = choice
    return choice


def resolve_backend(
    name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    dropout: float = 0.0,
) -> str:
    """The backend that ``lora_linear(x, weight, bias, lora_A, lora_B, ..., dropout=dropout,
    backend=name)`` runs on, or a clear error for a named backend that cannot run it."""
    if name == "auto":
        requires_grad = torch.is_grad_enabled() and (
            x.requires_grad or lora_A.requires_grad or lora_B.requires_grad or weight.requires_grad
            or (bias is not None and bias.requires_grad)
        )  # fmt: skip
        if _unpinned and not torch.compiler.is_compiling() and not torch.are_deterministic_algorithms_enabled():
            # Every later call of a problem class ends here: a tuple and a dict look-up, inline (a
            # call to choose costs more). Two shapes (hashable) give M, K, N and r, cheaper than
            # reading them (each .shape costs about 0.2 µs; the inputs were checked to agree);
            # get_device() is an int, -1 on the CPU (x.device would build an object).
            choice = _decided.get((x.shape, lora_B.shape, x.dtype, lora_A.dtype, x.get_device(), dropout, requires_grad, bias is None))
            if choice is not None:
                return choice["backend"]
        return choose(x, weight, bias, lora_A, lora_B, dropout, requires_grad)["backend"]
    if name == "torch":  # loaded at import and runs every call (cannot_run's answer, without asking it)
        return name
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    problem = cannot_run(name, x, lora_A.shape[0])
    if problem is not None:
        error, message = problem
        raise error(message)
    return name


def _fixed(x, lora_A) -> dict | None:
    """What is chosen without the problem class: a pin, compile, deterministic mode (module doc)."""
    pin = _pin()
    if pin is not None:
        name, reason = pin
        problem = cannot_run(name, x, lora_A.shape[0])
        if problem is not None:
            error, message = problem
            raise error(f"{message} ({reason})")
        return _choice(name, reason)
    if torch.compiler.is_compiling():
        return _FIXED_UNDER_COMPILE
    if torch.are_deterministic_algorithms_enabled():
        return _FIXED_WHEN_DETERMINISTIC
    return None


_FIXED_UNDER_COMPILE = _choice("torch", "torch.compile tracing: the fixed choice, no timing; pin a backend to compile a fused one")
_FIXED_WHEN_DETERMINISTIC = _choice("torch", "torch.use_deterministic_algorithms(True): the fixed choice, no timing")
_decided: dict[tuple, dict] = {}


def _rows(x: torch.Tensor) -> int:
    """M: the rows of ``x`` flattened to 2-D."""
    return x.shape[0] if x.dim() == 2 else math.prod(x.shape[:-1])


def _bucket(x: torch.Tensor) -> int:
    """M rounded up to a power of two; 0 and 1 give 1."""
    return 1 << max(_rows(x) - 1, 0).bit_length()


def _decide(x, weight, bias, lora_A, lora_B, dropout: float, requires_grad: bool, runs: bool) -> tuple[dict, bool]:
    """``choose`` for a problem class not decided in this process yet: from what can run, the
    cache, or a measurement; and whether that is settled (False: a stopgap for this call)."""
    if x.device.type not in TIMED_DEVICE_TYPES:
        return _choice("torch", f"{x.device.type} tensors run on the torch backend; no timing"), True
    rank = lora_A.shape[0]
    refusals = {name: cannot_run(name, x, rank) for name in FUSED_BACKENDS}
    # A backend that `fastlora doctor` found wrong, hung or crashing in this environment is not tried.
    for name, detail in doctor_failures(environment_key(x.device)).items():
        if refusals.get(name, True) is None:
            refusals[name] = (RuntimeError, f"backend={name!r} failed `fastlora doctor` here ({detail})")
    names = ["torch"] + [name for name, problem in refusals.items() if problem is None]
    if len(names) == 1:
        why = "; ".join(message for _, message in refusals.values())
        return _choice("torch", f"no fused backend can run this call ({why})"), True
    key = problem_key(x, weight, lora_A, dropout, requires_grad)
    build = lambda: dense_candidates(names, x, weight, bias, lora_A, lora_B, dropout, requires_grad)  # noqa: E731
    return settle(x.device, key, names, build, variant=bias is None, runs=runs)


def explain_backend(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor | None = None,
    *,
    dropout: float = 0.0,
    requires_grad: bool = True,
) -> dict:
    """What ``backend="auto"`` picks for ``lora_linear(x, weight, ·, lora_A, lora_B, dropout=dropout)``
    with (``requires_grad=True``) or without gradients, and why: ``{"backend": name, "reason": text
    (naming every excluded backend and why), "times_ms": {backend: median ms, or why it was
    excluded} or None}``. Measures the problem class if it is new (as the call itself would), on
    scratch tensors; does not run the layer. ``lora_B`` defaults to a tensor of shape
    ``[weight.shape[0], r]`` in ``lora_A``'s dtype."""
    if lora_B is None:
        lora_B = lora_A.new_empty((weight.shape[0], lora_A.shape[0]))
    return dict(choose(x, weight, None, lora_A, lora_B, dropout, requires_grad, runs=False))


def auto_summary(device: torch.device) -> str:
    """One line on what ``backend="auto"`` does for tensors on ``device`` in this process."""
    pin = _pin()
    if pin is not None:
        return f"{pin[0]}, {pin[1]}"
    if device.type not in TIMED_DEVICE_TYPES:
        return f"torch ({device.type} tensors; no timing)"
    return f"the backend measured fastest per problem class, remembered in {cache_path()}"


def clear_memory() -> None:
    """Forget the choices held in memory (the disk file stays), what has run and been warned about,
    and the ``FASTLORA_BACKEND`` read; the next choice rereads them."""
    global _disk_read, _unpinned
    with _lock:
        _unpinned = False
        _memory.clear()
        _decided.clear()
        _warmed.clear()
        _warned.clear()
        _env_pin.clear()
        _disk_read = False
    for clear in on_clear:
        clear()
