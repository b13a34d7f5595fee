"""Pure-PyTorch reference of the LoRA linear layer: the ground truth of every test.

    y = x @ weight.T + bias + scaling * (x @ lora_A.T) @ lora_B.T

Shapes: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` or None, ``lora_A [r, in]``,
``lora_B [out, r]`` (PEFT's layout). As in PEFT, the low-rank branch runs in the adapters' dtype
(``x`` is cast to it) and the result is cast back to ``x``'s dtype. Any device, any floating dtype,
float64 included; autograd gives every gradient. Kept deliberately plain: no fusion, no tricks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["lora_linear"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    base = F.linear(x, weight, bias)
    low_rank = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling
    return (base + low_rank).to(x.dtype)
