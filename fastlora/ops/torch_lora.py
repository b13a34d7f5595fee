"""The ``"torch"`` backend: the fastest plain-PyTorch composition, with a hand-written backward.

Forward is the Unsloth recipe: one GEMM for the base (bias folded in), the rank-r product ``x Aᵀ``,
then ``addmm_`` of the low-rank term straight into the base output, so no M×N temporary exists
beside ``y``. Backward mirrors it for ``grad_x``; ``grad_A`` and ``grad_B`` are two skinny GEMMs.
It runs on any device and dtype (float64 included) and is the default on the CPU.

LoRA dropout draws its mask from a ``torch.Generator`` seeded with the call's seed, so the backward
regenerates the same mask instead of saving it.

fp16 is the one dtype whose range is narrower than float32's: its low-rank products are formed in
float32 (see ``_low_rank_dtype``) and added to the fp16 output in float32, which costs an M×N
float32 temporary; fp32 adapters on a half base get the same fp32 branch, as in PEFT, and copies
of ``x`` and ``gy`` in fp32; otherwise the products run in ``x``'s dtype and the add is in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import register_backend, wide_dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; skips ``Tensor.to``'s dispatch (≈3 µs) when it would be a no-op."""
    return t if t.dtype == dtype else t.to(dtype)


def _low_rank_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    """dtype the rank-r products are multiplied in: x's, or float32 for fp16 activations (whose
    products can exceed fp16's range) and for fp32 adapters on a half base (PEFT's precision)."""
    if x.dtype == torch.float16 or lora_A.dtype.itemsize > x.dtype.itemsize:
        return torch.float32
    return x.dtype


def _mm_wide(a: torch.Tensor, b: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``a @ b`` multiplied in ``compute`` and returned in ``wide_dtype(compute)``."""
    return _as(torch.mm(_as(a, compute), _as(b, compute)), wide_dtype(compute))


def _add_low_rank(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + scaling·left @ right`` with ``left`` wide: in place in ``out``'s dtype, or formed in
    float32 and rounded once where ``out`` is fp16 (range) or ``right`` is wider than ``out`` (fp32
    adapters on a half base, whose low-rank term PEFT keeps in fp32)."""
    if out.dtype == torch.float16 or right.dtype.itemsize > out.dtype.itemsize:
        return torch.addmm(out.to(left.dtype), left, _as(right, left.dtype), alpha=scaling).to(out.dtype)
    return out.addmm_(_as(left, out.dtype), _as(right, out.dtype), alpha=scaling)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _dropout_scale(x: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """``mask / (1 − p)`` for ``x``'s shape, regenerated identically from ``seed``."""
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - dropout_p, generator=generator)
    return keep.mul_(1 / (1 - dropout_p)) if dropout_p < 1 else keep


def torch_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    x_low_rank = x * _dropout_scale(x, dropout_p, seed) if dropout_p else x
    xa = _mm_wide(x_low_rank, lora_A.t(), _low_rank_dtype(x, lora_A))
    y = _add_low_rank(F.linear(x, weight, bias), xa, lora_B.t(), scaling)
    return y, xa


def torch_backward(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    dropout_scale = _dropout_scale(x, dropout_p, seed) if dropout_p and (need_x or need_A) else None
    compute = _low_rank_dtype(x, lora_A)
    g_xa = _mm_wide(gy, lora_B, compute) if (need_x or need_A) else None
    if not need_x:
        grad_x = _empty(x)
    elif dropout_scale is None:
        grad_x = _add_low_rank(gy.mm(weight), g_xa, lora_A, scaling)
    else:
        low_rank = torch.mm(g_xa, _as(lora_A, g_xa.dtype)).mul_(dropout_scale).mul_(scaling)
        grad_x = low_rank.add_(gy.mm(weight)).to(x.dtype)
    if need_A:
        x_low_rank = x * dropout_scale if dropout_scale is not None else x
        grad_A = _as(_mm_wide(g_xa.t(), x_low_rank, compute).mul_(scaling), lora_A.dtype)
    else:
        grad_A = _empty(lora_A)
    grad_B = _as(_mm_wide(gy.t(), xa, compute).mul_(scaling), lora_B.dtype) if need_B else _empty(lora_B)
    grad_bias = _as(gy.sum(0, dtype=wide_dtype(gy.dtype)), gy.dtype) if need_bias else _empty(gy)
    return grad_x, grad_A, grad_B, grad_bias


TORCH_OPS = register_backend("torch", torch_forward, torch_backward)
