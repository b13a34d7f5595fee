"""Which backend a call runs on: a named one (checked by the registry) or ``"auto"``'s choice.

The layering is ``registry`` (the table of backends) → ``auto`` (the measured choice among them) →
``dispatch`` (this resolver), each importing only the ones before it.
"""

from __future__ import annotations

import torch

from .auto import choose
from .registry import BACKEND_NAMES, backend_ops, cannot_run  # noqa: F401  (backend_ops: the callers' next step)


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
        return choose(x, weight, bias, lora_A, lora_B, dropout, requires_grad)["backend"]
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    problem = cannot_run(name, x, lora_A.shape[0])
    if problem is not None:
        error, message = problem
        raise error(message)
    return name
