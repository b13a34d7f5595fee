"""Argument validation shared by every public entry point.

Each check raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape, device or
value) with a message naming the argument, what was expected and what was given. The checks read
only shapes, dtypes and devices, so they cost no device sync and trace under ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}")
    return value


def _require_dim(name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")


def check_scaling(scaling: object) -> float:
    """``scaling`` as a finite Python float."""
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number (a Python float), got {type(scaling).__name__}")
    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    return scaling


def check_rank(r: object) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}")
    return int(r)


def check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling) -> float:
    """Validate the arguments of ``lora_linear``; returns ``scaling`` as a float.

    Shapes: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` or None, ``lora_A [r, in]``,
    ``lora_B [out, r]``. All on one device. ``x``, ``weight`` and ``bias`` share one dtype; the
    adapters share theirs, which is ``x``'s or float32 (PEFT's default fp32 adapters).
    """
    for name, value in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features], got a 0-D tensor")
    _require_dim("weight", weight, 2, "[out_features, in_features]")
    _require_dim("lora_A", lora_A, 2, "[r, in_features]")
    _require_dim("lora_B", lora_B, 2, "[out_features, r]")
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must equal weight.shape[1] = in_features = {in_features}, got x of shape {tuple(x.shape)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape [r, in_features={in_features}], got {tuple(lora_A.shape)}")
    if r < 1:
        raise ValueError(f"lora_A must have at least one row (r >= 1), got shape {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B must have shape [out_features={out_features}, r={r}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [out_features={out_features}], got {tuple(bias.shape)}")

    for name, value in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if value is not None and value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}; move all tensors to one device")

    if weight.dtype != x.dtype:
        raise TypeError(f"weight's dtype must equal x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias's dtype must equal x's dtype {x.dtype}, got {bias.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B's dtype must equal lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"adapters (lora_A, lora_B) must be in x's dtype {x.dtype} or float32, got {lora_A.dtype}")
    return check_scaling(scaling)
