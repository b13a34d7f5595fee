"""How close to the float64 reference a result must be: the project's one tolerance table.

Every check (tests, ``fastlora demo``, ``fastlora bench``) measures ``‖out − ref‖ / ‖ref‖`` against
``fastlora.reference`` evaluated in float64, and accepts it up to ``tolerance(dtype, device)``: the
rounding that the dtype of the computation allows for LoRA-sized reductions.
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# fp32 matmuls on CUDA under torch.set_float32_matmul_precision("high"/"medium") run in TF32
# (10-bit mantissa).
TF32_TOLERANCE = 5e-4


def matmul_precision() -> str:
    """``torch.get_float32_matmul_precision()``, also once the per-backend API has been used
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, torch ≥ 2.9), where that getter raises
    ("you have used mix of the legacy and new APIs", torch 2.14): then ``"high"`` for TF32 and
    ``"highest"`` otherwise, as cuBLAS then computes torch's own fp32 matmuls."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "high" if getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32" else "highest"


def tolerance(dtype: torch.dtype, device: str | torch.device) -> float:
    """The largest relative error accepted for a computation in ``dtype`` on ``device``."""
    tf32 = torch.device(device).type == "cuda" and matmul_precision() != "highest"
    return TF32_TOLERANCE if dtype == torch.float32 and tf32 else TOLERANCE[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (``‖out‖`` when ``ref`` is zero or empty; NaN if ``out``
    holds a NaN, which fails every ``<=`` check)."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise ValueError(f"rel_error: shapes differ, {tuple(out.shape)} vs {tuple(ref.shape)}")
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom else out.norm().item()
