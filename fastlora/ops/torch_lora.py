"""The ``"torch"`` backend: the fastest plain-PyTorch composition, with a hand-written backward.

Forward is the Unsloth recipe: one GEMM for the base (bias folded in), the rank-r product ``x Aᵀ``,
then ``addmm_`` of the low-rank term straight into the base output, so no M×N temporary exists
beside ``y``. Backward mirrors it for ``grad_x``; ``grad_A`` and ``grad_B`` are two skinny GEMMs.
It runs on any device and dtype (float64 included) and is the default on the CPU.

Every product runs in ``wide_dtype(x.dtype)``: float32 for fp16/bf16 inputs, which are upcast, so
that ``y`` and ``grad_x`` are rounded once, as the fused kernels round them. Rounding the base term
to fp16/bf16 before adding the low-rank term would leave an error of the terms' size in a sum that
can be far smaller: where the two cancel, that is beyond the 1e-2 relative bound. The cost is
float32 copies of the half operands; on a GPU the fused backends are the fast path for half precision.

LoRA dropout draws its mask from a ``torch.Generator`` seeded with the call's seed, so the backward
regenerates the same mask instead of saving it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._contract import register_backend, wide_dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; skips ``Tensor.to``'s dispatch (≈3 µs) when it would be a no-op."""
    return t if t.dtype == dtype else t.to(dtype)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _dropout_scale(x: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """``mask / (1 − p)`` for ``x``'s shape and dtype, regenerated identically from ``seed``."""
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - dropout_p, generator=generator)
    return keep.mul_(1 / (1 - dropout_p)) if dropout_p < 1 else keep


def torch_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    wide = wide_dtype(x.dtype)
    x_wide = _as(x, wide)
    x_low_rank = x_wide * _dropout_scale(x_wide, dropout_p, seed) if dropout_p else x_wide
    xa = torch.mm(x_low_rank, _as(lora_A, wide).t())
    y = F.linear(x_wide, _as(weight, wide), None if bias is None else _as(bias, wide))
    y.addmm_(xa, _as(lora_B, wide).t(), alpha=scaling)
    return _as(y, x.dtype), xa


def torch_backward(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    wide = xa.dtype
    gy_wide, x_wide = _as(gy, wide), _as(x, wide)
    dropout_scale = _dropout_scale(x_wide, dropout_p, seed) if dropout_p and (need_x or need_A) else None
    g_xa = torch.mm(gy_wide, _as(lora_B, wide)) if (need_x or need_A) else None
    if not need_x:
        grad_x = _empty(x)
    elif dropout_scale is None:
        grad_x = _as(gy_wide.mm(_as(weight, wide)).addmm_(g_xa, _as(lora_A, wide), alpha=scaling), x.dtype)
    else:
        low_rank = torch.mm(g_xa, _as(lora_A, wide)).mul_(dropout_scale).mul_(scaling)
        grad_x = _as(low_rank.add_(gy_wide.mm(_as(weight, wide))), x.dtype)
    if need_A:
        x_low_rank = x_wide * dropout_scale if dropout_scale is not None else x_wide
        grad_A = _as(torch.mm(g_xa.t(), x_low_rank).mul_(scaling), lora_A.dtype)
    else:
        grad_A = _empty(lora_A)
    grad_B = _as(torch.mm(gy_wide.t(), xa).mul_(scaling), lora_B.dtype) if need_B else _empty(lora_B)
    grad_bias = _as(gy_wide.sum(0), gy.dtype) if need_bias else _empty(gy)
    return grad_x, grad_A, grad_B, grad_bias


TORCH_OPS = register_backend("torch", torch_forward, torch_backward)
