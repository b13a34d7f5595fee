"""The backend registry: which backends exist on this machine, and which one a call runs on.

``"torch"`` always exists. ``"triton"`` needs the triton package; ``"cuda"`` the compiled extension
``fastlora._C`` and an Ampere-or-newer GPU. Both fused backends run on CUDA tensors (``"triton"``
also on CPU tensors under ``TRITON_INTERPRET=1``, which the CPU test suite uses), in fp16, bf16 and
fp32, for r ≤ 256. This module is the table of backends and imports nothing of fastlora above it:
``"auto"`` picks among them (``fastlora.ops.auto``), ``fastlora.ops.dispatch`` resolves a call's
``backend=`` argument.

Loading is lazy: ``import fastlora`` loads only ``"torch"`` (a few pure-PyTorch op registrations, so
that ``"auto"`` always has a loaded backend, inside ``torch.compile`` too). ``"triton"`` (the triton
import and kernel definitions) and ``"cuda"`` (loading ``fastlora._C``) load on first use, i.e. the
first ``available_backends()`` or call that needs them, once, under a lock; the outcome (the ops, or
why not) is cached, so later resolving is a dict look-up. Nothing here initialises CUDA: loading
counts devices with ``torch.cuda.is_available()`` (no context), and the cuda backend's capability
check runs on the first call with a CUDA tensor, whose context already exists.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ._contract import LoRAOps

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
FUSED_BACKENDS = ("triton", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FUSED_RANK = 256


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine; the message names the fix."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here; ``detail`` says on what, or why not. ``str()`` reads
    ``"available: <what it runs on>"`` or ``"unavailable: <why, and the fix>"``."""

    available: bool
    detail: str

    def __str__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.detail}"


def _load_torch() -> LoRAOps:
    from .torch_lora import TORCH_OPS

    return TORCH_OPS


def _load_triton() -> LoRAOps | str:
    """The triton backend's ops, or why it cannot run here.

    A triton that is installed but unusable (too old, or failing at import, e.g. on a driver or ABI
    mismatch) disables this backend only, with one warning, since its user meant to use it: the
    rest of fastlora works. A triton that is simply not installed is not warned about.
    """
    import re
    import sys
    import warnings

    # 3.6 is the oldest triton the kernels are checked on (CI runs a subset under 3.6 and everything
    # under 3.8; the GPU image has 3.6). Older ones lack APIs the kernels or the compile-informed
    # pruning use (3.4: JITFunction._pack_args, knobs.compilation.instrumentation_mode), and below
    # 3.0 tl.dot(input_precision=) and early_config_prune(**kwargs) do not exist.
    min_version = (3, 6)
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as err:  # whatever triton's import raises (e.g. RuntimeError), fastlora must work
        if isinstance(err, ModuleNotFoundError) and err.name == "triton":
            return "the triton package is not installed; install it with `pip install triton`"
        # torch probes for triton too (torch.utils._triton) and copes with an ImportError only:
        # make every later `import triton` raise one instead of repeating this failure.
        sys.modules["triton"] = None
        reason = f"importing triton failed ({type(err).__name__}: {err}); reinstall a triton that matches your torch"
    else:
        version = str(getattr(triton, "__version__", "unknown"))
        found = re.match(r"(\d+)\.(\d+)", version)
        if found and tuple(map(int, found.groups())) >= min_version:
            from .triton_lora import TRITON_OPS

            return TRITON_OPS
        reason = f"triton {version} is too old, the kernels need triton >= 3.6; upgrade with `pip install -U 'triton>=3.6'`"
    warnings.warn(f"fastlora: backend='triton' is disabled: {reason}", RuntimeWarning, stacklevel=3)
    return reason


def _load_cuda() -> LoRAOps | str:
    from .cuda_lora import load_cuda_ops

    return load_cuda_ops()


_LOADERS = {"torch": _load_torch, "triton": _load_triton, "cuda": _load_cuda}
_loaded: dict[str, LoRAOps | str] = {}
_load_lock = threading.Lock()


def _load(name: str) -> LoRAOps | str:
    with _load_lock:
        if name not in _loaded:
            _loaded[name] = _LOADERS[name]()
        return _loaded[name]


def backend_state(name: str) -> LoRAOps | str:
    """The ops of backend ``name`` (loaded on first use), or why it cannot run here."""
    state = _loaded.get(name)
    if state is not None:
        return state
    if torch.compiler.is_compiling():
        # A backend first needed while dynamo traces: load it outside the trace (one graph break;
        # the guard on `_loaded` then recompiles once, without it).
        return torch.compiler.disable(_load)(name)
    return _load(name)


def available_backends() -> dict[str, BackendStatus]:
    """Each backend's name → its ``BackendStatus`` (``.available``; ``.detail``: what it runs on,
    or why it cannot run here). Loads every backend not loaded yet. What ``"auto"`` picks for one
    problem is ``fastlora.explain_backend``'s answer."""
    statuses = {}
    for name in _LOADERS:
        state = backend_state(name)
        if isinstance(state, str):
            statuses[name] = BackendStatus(False, state)
        elif name == "torch":
            statuses[name] = BackendStatus(True, "any device and floating dtype, any rank")
        else:
            devices = "/".join(state.runs_on or ("any",))
            statuses[name] = BackendStatus(True, f"{devices} tensors, float16/bfloat16/float32, r <= {MAX_FUSED_RANK}")
    return statuses


def cannot_run(name: str, x: torch.Tensor, rank: int) -> tuple[type[Exception], str] | None:
    """None if backend ``name`` can run a call with input ``x`` and LoRA rank ``rank``; else the
    error type and message that asking for it by name raises."""
    state = backend_state(name)
    if isinstance(state, str):
        return BackendUnavailableError, f"backend={name!r} is unavailable: {state}; use backend='torch' or 'auto'"
    if name == "torch":
        return None
    if state.runs_on is not None and x.device.type not in state.runs_on:
        message = f"backend={name!r} runs on {'/'.join(state.runs_on)} tensors, got tensors on {x.device}"
        return ValueError, f"{message}; use backend='torch' or 'auto'"
    if x.dtype not in FUSED_DTYPES:
        return TypeError, f"backend={name!r} supports float16, bfloat16 and float32, got {x.dtype}; use backend='torch'"
    if rank > MAX_FUSED_RANK:
        return ValueError, f"backend={name!r} supports r <= {MAX_FUSED_RANK}, got r={rank}; use backend='torch'"
    if state.device_unsupported is not None and x.device.type == "cuda":
        reason = state.device_unsupported(x.device)
        if reason is not None:
            return BackendUnavailableError, f"backend={name!r} cannot run on {x.device}: {reason}; use backend='torch' or 'auto'"
    return None


def backend_ops(name: str) -> LoRAOps:
    """The ops of a loaded backend (one that ``fastlora.ops.dispatch.resolve_backend`` returned)."""
    return _loaded[name]


_load("torch")
