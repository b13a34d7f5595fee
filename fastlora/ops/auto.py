"""``backend="auto"``: the backend that measured fastest on this GPU for this problem, remembered.

A *problem class* is the GPU's name, ``x``'s dtype, the adapters' dtype, M rounded up to a power of
two, K, N, r, dropout on or off, and whether gradients are needed. On the first call of a class,
``choose`` times every backend that can run it (``"torch"`` always among them) on scratch tensors of
the call's shapes, dtypes and strides: forward, plus backward when gradients are needed, after two
warm-up runs that let each backend autotune, then ``REPS`` runs timed with CUDA events; the median
wins. The choice is kept in memory and in ``<cache dir>/autotune.json`` (``FASTLORA_CACHE_DIR``,
else ``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``) under the GPU name and the driver,
torch, triton and fastlora versions, so a new process does not time again. A cache file that is
unreadable or not fastlora's is ignored with one warning and rewritten at the next measurement.

Timing leaves the caller's state alone: it runs on scratch tensors (seeded from a private
generator; a frozen weight, which every backend only reads, is used in place), inside
``torch.random.fork_rng`` (CPU and CUDA generators restored), with autocast off, and builds its
autograd graph on the scratch tensors only. Two threads whose first calls coincide
time once (one lock) and agree. A backend that raises while timed is skipped; its reason is kept.

What is chosen without timing, in this order:

1. a pin: ``fastlora.set_default_backend(name)``, else ``FASTLORA_BACKEND=torch|triton|cuda`` (read
   at the first ``"auto"`` call of the process), is used as if passed as ``backend=`` (a backend
   that cannot run the call raises, naming why);
2. CPU tensors (and any non-CUDA device): ``"torch"``;
3. ``torch.compile`` tracing: ``"torch"``, which the compiled graph keeps (the choice is made when
   the graph is traced, and timing cannot run there). To compile a fused backend, pin it;
4. ``torch.use_deterministic_algorithms(True)``: ``"torch"``, a fixed choice (a measured one could
   change between runs as the cache fills);
5. no fused backend can run the call (dtype, r > 256, not installed, GPU too old): ``"torch"``;
6. CUDA-graph capture (``torch.cuda.is_current_stream_capturing()``): the cached choice, else
   ``"torch"`` (uncached: a capture cannot run the timing's synchronisations).

Distributed: each rank measures on its own GPU; ranks are not made to agree (a broadcast would be a
collective inside the first forward of each problem class, and ranks whose batches fall in different
M buckets would wait on each other forever). The backends agree within the tolerance table, so mixed
choices change rounding, not results; pin a backend where ranks must run identical kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import json
import math
import os
import statistics
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from .registry import FUSED_BACKENDS, backend_ops, cannot_run

# timer(backend name, run, device) → median ms of run(); tests inject a fake one with set_timer.
Timer = Callable[[str, Callable[[], None], torch.device], float]

WARMUP = 2  # runs before timing: the first autotunes (triton) and fills the allocator's cache
REPS = 5
CACHE_FORMAT = "fastlora-autotune/1"
_PIN_NAMES = ("torch", "triton", "cuda")
# Devices whose tensors are measured; others run "torch". The CPU tests add "cpu", with fake backends.
TIMED_DEVICE_TYPES = ("cuda",)


def cuda_event_timer(name: str, run: Callable[[], None], device: torch.device) -> float:
    """Median milliseconds of ``run`` (backend ``name``'s step) on ``device``'s current stream,
    timed with CUDA events after ``WARMUP`` untimed runs."""
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_timer: Timer = cuda_event_timer
_pinned: str | None = None
_env_pin: list[str | None] = []  # FASTLORA_BACKEND, read once (os.environ.get costs µs a call)
_memory: dict[str, dict] = {}  # problem key → {"backend", "times_ms"} for this process's environment
_disk_read = False
_lock = threading.Lock()


def set_default_backend(name: str | None) -> None:
    """Pin what ``backend="auto"`` runs on to ``"torch"``, ``"triton"`` or ``"cuda"``, in this
    process; None unpins (``FASTLORA_BACKEND`` then applies, else measuring). Explicit
    ``backend=`` arguments are not affected."""
    global _pinned
    if name is not None and name not in _PIN_NAMES:
        raise ValueError(f"set_default_backend: name must be one of {_PIN_NAMES} or None, got {name!r}")
    _pinned = name


def set_timer(timer: Timer | None) -> None:
    """Replace the timer (tests inject a fake one); None restores ``cuda_event_timer``."""
    global _timer
    _timer = timer or cuda_event_timer


def _pin() -> tuple[str, str] | None:
    if _pinned is not None:
        return _pinned, f"pinned by fastlora.set_default_backend({_pinned!r})"
    if not _env_pin:
        _env_pin.append(os.environ.get("FASTLORA_BACKEND"))
    env = _env_pin[0]
    if not env:
        return None
    if env not in _PIN_NAMES:
        raise ValueError(f"FASTLORA_BACKEND must be one of {_PIN_NAMES}, got {env!r}")
    return env, f"pinned by FASTLORA_BACKEND={env}"


def cache_path() -> Path:
    """Where measured choices are kept: ``$FASTLORA_CACHE_DIR/autotune.json``, else under
    ``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``."""
    root = os.environ.get("FASTLORA_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlora"
    return Path(root) / "autotune.json"


@functools.cache
def _driver_version() -> str:
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def environment_key(device: torch.device) -> str:
    """What a measurement depends on besides the problem: GPU name and software versions."""
    from .. import __version__

    return (
        f"{_device_name(device)} | driver {_driver_version()} | torch {torch.__version__} | "
        f"triton {_package_version('triton')} | fastlora {__version__}"
    )


def problem_key(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, dropout: float, requires_grad: bool) -> str:
    """The problem class of a call, as the cache file spells it (the GPU is in the environment key)."""
    return (
        f"x={str(x.dtype).removeprefix('torch.')} adapters={str(lora_A.dtype).removeprefix('torch.')} "
        f"M<={_bucket(x)} K={x.shape[-1]} N={weight.shape[0]} r={lora_A.shape[0]} "
        f"dropout={'on' if dropout else 'off'} grad={'yes' if requires_grad else 'no'}"
    )


def _read_disk(path: Path, *, warn: bool) -> dict:
    """The file's environments (``{env key: {problem key: entry}}``), or {} (warning once if asked)
    when it is missing, corrupt or not fastlora's."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        problem = f"it could not be read ({type(err).__name__}: {err})"
    else:
        environments = data.get("environments") if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("format") == CACHE_FORMAT and isinstance(environments, dict):
            return environments
        problem = f"it is not a {CACHE_FORMAT} file"
    if warn:
        message = f"fastlora: ignoring the autotune cache {path}: {problem}; it is rewritten at the next measurement"
        warnings.warn(message, RuntimeWarning, stacklevel=5)
    return {}


def _write_disk(path: Path, env: str, key: str, entry: dict) -> None:
    environments = _read_disk(path, warn=False)  # merge what other processes wrote meanwhile
    environments.setdefault(env, {})[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        temporary.write_text(json.dumps({"format": CACHE_FORMAT, "environments": environments}, indent=1, sort_keys=True))
        os.replace(temporary, path)  # atomic: a reader sees the old file or the new one
    except OSError as err:
        warnings.warn(f"fastlora: could not write the autotune cache {path}: {err}", RuntimeWarning, stacklevel=5)


def _cached(env: str, key: str, candidates: list[str]) -> dict | None:
    """The remembered entry for ``key``, if its backend can still run; reads the disk file once."""
    global _disk_read
    if not _disk_read:
        _disk_read = True
        for disk_key, entry in _read_disk(cache_path(), warn=True).get(env, {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("backend"), str):
                _memory.setdefault(f"{env} | {disk_key}", entry)
    entry = _memory.get(f"{env} | {key}")
    return entry if entry is not None and entry["backend"] in candidates else None


def _scratch_like(t: torch.Tensor | None, generator: torch.Generator, requires_grad: bool) -> torch.Tensor | None:
    """A tensor of ``t``'s shape, dtype, device and strides, random, not ``t``; a leaf that requires
    grad if asked."""
    if t is None:
        return None
    values = torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32)
    scratch = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(values)
    return scratch.requires_grad_(requires_grad)


def _measure(candidates, x, weight, bias, lora_A, lora_B, dropout, requires_grad) -> dict[str, float | str]:
    """Each candidate's median ms on scratch copies of the call, or the error it raised."""
    times: dict[str, float | str] = {}
    on_cuda = x.device.type == "cuda"
    # On x's device (its events and streams, not the current device's), its generators restored after.
    device_scope = torch.cuda.device(x.device) if on_cuda else contextlib.nullcontext()
    rng_scope = torch.random.fork_rng(devices=[x.get_device()] if on_cuda else [])
    with device_scope, rng_scope, torch.autocast(x.device.type, enabled=False):
        generator = torch.Generator(device=x.device).manual_seed(0)
        inputs = (x, weight, bias, lora_A, lora_B)
        # What needs a gradient is the call's, or for explain_backend's bare question the adapters'.
        needs = [t is not None and t.requires_grad for t in inputs]
        if requires_grad and not any(needs):
            needs[3] = needs[4] = True
        args = [_scratch_like(t, generator, requires_grad and need) for t, need in zip(inputs, needs)]
        if not needs[1]:
            # A frozen weight (LoRA's case) is only read by every backend: time on it in place
            # rather than holding a second copy of the largest tensor on a possibly full GPU.
            args[1] = weight.detach()
        seed = torch.tensor(0, dtype=torch.int64) if dropout else None
        gy = torch.randn((*x.shape[:-1], weight.shape[0]), generator=generator, device=x.device).to(x.dtype)
        gy2d = gy.reshape(-1, weight.shape[0])
        scaling = 0.5
        for name in candidates:
            ops = backend_ops(name)

            def run(ops=ops):
                for leaf in args:  # as zero_grad(set_to_none=True): no accumulation kernels timed
                    if leaf is not None:
                        leaf.grad = None
                with torch.set_grad_enabled(requires_grad):
                    x2d = args[0].reshape(-1, x.shape[-1])
                    y = ops.function.apply(x2d, args[1], args[2], args[3], args[4], scaling, dropout, seed)
                    if requires_grad:
                        torch.autograd.backward(y, gy2d)

            try:
                times[name] = float(_timer(name, run, x.device))
            except Exception as err:  # a backend that fails here must not fail the user's call
                times[name] = f"raised {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return times


def _choice(backend: str, reason: str, times_ms: dict | None = None) -> dict:
    return {"backend": backend, "reason": reason, "times_ms": times_ms}


def choose(x, weight, bias, lora_A, lora_B, dropout: float, requires_grad: bool) -> dict:
    """``{"backend", "reason", "times_ms"}`` for this call under ``backend="auto"`` (see the module
    doc); times a new problem class. ``times_ms`` maps each timed backend to its median ms (or the
    error it raised), None where nothing was timed. Treat the dict as read-only: it is shared."""
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
    # Every later call of a problem class ends here, a tuple and a dict look-up: the call's
    # overhead (get_device() is an int, -1 on the CPU; x.device would build an object).
    fast_key = (
        x.get_device(), x.dtype, lora_A.dtype, _rows(x), x.shape[-1], weight.shape[0], lora_A.shape[0], bool(dropout), requires_grad
    )
    choice = _decided.get(fast_key)
    if choice is None:
        choice, settled = _decide(x, weight, bias, lora_A, lora_B, dropout, requires_grad)
        if settled:
            _decided[fast_key] = choice
    return choice


_FIXED_UNDER_COMPILE = _choice("torch", "torch.compile tracing: the fixed choice, no timing; pin a backend to compile a fused one")
_FIXED_WHEN_DETERMINISTIC = _choice("torch", "torch.use_deterministic_algorithms(True): the fixed choice, no timing")
_decided: dict[tuple, dict] = {}


def _rows(x: torch.Tensor) -> int:
    """M: the rows of ``x`` flattened to 2-D."""
    return x.shape[0] if x.dim() == 2 else math.prod(x.shape[:-1])


def _bucket(x: torch.Tensor) -> int:
    """M rounded up to a power of two; 0 and 1 give 1."""
    return 1 << max(_rows(x) - 1, 0).bit_length()


def _decide(x, weight, bias, lora_A, lora_B, dropout: float, requires_grad: bool) -> tuple[dict, bool]:
    """``choose`` for a problem class not decided in this process yet: from what can run, the
    cache, or a measurement; and whether that is settled (False: a stopgap until it can be timed)."""
    if x.device.type not in TIMED_DEVICE_TYPES:
        return _choice("torch", f"{x.device.type} tensors run on the torch backend; no timing"), True
    rank = lora_A.shape[0]
    refusals = {name: cannot_run(name, x, rank) for name in FUSED_BACKENDS}
    candidates = ["torch"] + [name for name, problem in refusals.items() if problem is None]
    if len(candidates) == 1:
        why = "; ".join(message for _, message in refusals.values())
        return _choice("torch", f"no fused backend can run this call ({why})"), True
    env, key = environment_key(x.device), problem_key(x, weight, lora_A, dropout, requires_grad)
    with _lock:  # a thread that finds the lock taken waits, then reads the first one's entry
        entry = _cached(env, key, candidates)
        if entry is not None:
            return _choice(entry["backend"], f"measured fastest for {key} (cached)", entry.get("times_ms")), True
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return _choice("torch", "CUDA-graph capture and nothing cached: the fixed choice, no timing"), False
        times = _measure(candidates, x, weight, bias, lora_A, lora_B, dropout, requires_grad)
        timed = {name: ms for name, ms in times.items() if isinstance(ms, float)}
        if not timed:
            # Settled for this process (retrying each call would repeat the failures), not on disk.
            return _choice("torch", "every backend raised while timed; torch, not cached on disk", times), True
        entry = {"backend": min(timed, key=timed.get), "times_ms": times}
        _memory[f"{env} | {key}"] = entry
        _write_disk(cache_path(), env, key, entry)
    return _choice(entry["backend"], f"measured fastest for {key}", times), True


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
    with (``requires_grad=True``) or without gradients, and why: ``{"backend": name, "reason": text,
    "times_ms": {backend: median ms, or the error it raised} or None}``. Measures the problem class
    if it is new (as the call itself would), on scratch tensors; does not run the layer.
    ``lora_B`` defaults to a tensor of shape ``[weight.shape[0], r]`` in ``lora_A``'s dtype."""
    if lora_B is None:
        lora_B = lora_A.new_empty((weight.shape[0], lora_A.shape[0]))
    return dict(choose(x, weight, None, lora_A, lora_B, dropout, requires_grad))


def auto_summary(device: torch.device) -> str:
    """One line on what ``backend="auto"`` does for tensors on ``device`` in this process."""
    pin = _pin()
    if pin is not None:
        return f"{pin[0]}, {pin[1]}"
    if device.type not in TIMED_DEVICE_TYPES:
        return f"torch ({device.type} tensors; no timing)"
    return f"the backend measured fastest per problem class, remembered in {cache_path()}"


def clear_memory() -> None:
    """Forget the choices held in memory (the disk file stays) and the ``FASTLORA_BACKEND`` read;
    the next choice rereads both."""
    global _disk_read
    with _lock:
        _memory.clear()
        _decided.clear()
        _env_pin.clear()
        _disk_read = False
