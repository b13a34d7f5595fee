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
    try:
        from .ops.triton_lora import TRITON_OPS
    except ImportError as err:
        return f"the triton package is not importable ({err}); install it with `pip install triton`"
    return TRITON_OPS


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
        raise BackendUnavailableError(f"backend={name!r} is unavailable: {_BACKENDS[name]}")
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
