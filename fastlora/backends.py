"""Backend registry: which backends exist on this machine, and which one a call runs on.

``"torch"`` always exists. ``"triton"`` needs the triton package; ``"cuda"`` the compiled extension
``fastlora._C``. Both fused backends run on CUDA tensors (``"triton"`` also on CPU tensors under
``TRITON_INTERPRET=1``, which the CPU test suite uses), in fp16, bf16 and fp32, for r ≤ 256.
Availability is settled once, at import, so that resolving a backend inside ``torch.compile`` is a
dict look-up.
"""

from __future__ import annotations

import torch

from .ops._registry import LoRAOps
from .ops.torch_lora import TORCH_OPS

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
# "auto" tries the fused backends in this order on CUDA tensors.
AUTO_ORDER = ("triton", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FUSED_RANK = 256


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine; the message names the fix."""


def _load_triton() -> LoRAOps | str:
    """The triton backend's ops, or why it cannot run here.

    A triton that is installed but unusable (too old, or failing at import, e.g. on a driver or ABI
    mismatch) disables this backend only, with one warning, since its user meant to use it: the
    rest of fastlora imports and works. A triton that is simply not installed is not warned about.
    """
    import re
    import sys
    import warnings

    # tl.dot(..., input_precision=) and early_config_prune(**kwargs) (the pruner reads R_PAD from
    # the kwargs) both arrived in triton 3.0; below it the kernels cannot be compiled.
    min_version = (3, 0)
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as err:  # whatever triton's import raises (e.g. RuntimeError), `import fastlora` must work
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
            from .ops.triton_lora import TRITON_OPS

            return TRITON_OPS
        reason = f"triton {version} is too old, the kernels need triton >= 3.0; upgrade with `pip install -U 'triton>=3.0'`"
    warnings.warn(f"fastlora: backend='triton' is disabled: {reason}", RuntimeWarning, stacklevel=2)
    return reason


def _load_cuda() -> LoRAOps | str:
    from .ops.cuda_lora import load_cuda_ops

    return load_cuda_ops()


_BACKENDS: dict[str, LoRAOps | str] = {"torch": TORCH_OPS, "triton": _load_triton(), "cuda": _load_cuda()}


def available_backends() -> dict[str, str | None]:
    """Each backend's name → None where it can run here, else the reason it cannot."""
    return {name: None if isinstance(ops, LoRAOps) else ops for name, ops in _BACKENDS.items()}


def _fused_supports(x: torch.Tensor, rank: int) -> bool:
    return x.dtype in FUSED_DTYPES and rank <= MAX_FUSED_RANK


def resolve_backend(name: str, x: torch.Tensor, rank: int) -> str:
    """The backend a call with input ``x`` and LoRA rank ``rank`` runs on, or a clear error."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        if x.device.type == "cuda" and _fused_supports(x, rank):
            for candidate in AUTO_ORDER:
                if isinstance(_BACKENDS[candidate], LoRAOps):
                    return candidate
        return "torch"
    if name == "torch":
        return name
    if isinstance(_BACKENDS[name], str):
        raise BackendUnavailableError(f"backend={name!r} is unavailable: {_BACKENDS[name]}; use backend='torch' or 'auto'")
    runs_on = _BACKENDS[name].runs_on
    if runs_on is not None and x.device.type not in runs_on:
        raise ValueError(
            f"backend={name!r} runs on {'/'.join(runs_on)} tensors, got tensors on {x.device}; use backend='torch' or 'auto'"
        )
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"backend={name!r} supports float16, bfloat16 and float32, got {x.dtype}; use backend='torch'")
    if rank > MAX_FUSED_RANK:
        raise ValueError(f"backend={name!r} supports r <= {MAX_FUSED_RANK}, got r={rank}; use backend='torch'")
    return name


def backend_ops(name: str) -> LoRAOps:
    """The ops of a backend that ``resolve_backend`` returned."""
    return _BACKENDS[name]
