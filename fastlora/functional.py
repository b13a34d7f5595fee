"""``lora_linear``: the functional form of the fused LoRA layer."""

from __future__ import annotations

import torch

from ._checks import check_lora_inputs
from .backends import backend_ops, resolve_backend


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ weight.T + bias + scaling * (x @ lora_A.T) @ lora_B.T``, differentiable.

    Shapes: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` or None, ``lora_A [r, in]``,
    ``lora_B [out, r]`` (PEFT's layout); returns ``[..., out]`` in ``x``'s dtype. The adapters may
    be float32 while ``x`` and ``weight`` are fp16/bf16 (PEFT's default). ``backend`` is one of
    ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` (see ``fastlora.backends``).
    """
    scaling = check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling)
    ops = backend_ops(resolve_backend(backend, x, lora_A.shape[0]))
    y, _ = ops.forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling)
    return y.reshape(*x.shape[:-1], weight.shape[0])
