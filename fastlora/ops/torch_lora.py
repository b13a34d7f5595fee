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
    xa = F.linear(x_low_rank, _as(lora_A, wide))  # = mm(x, Aᵀ), with the transpose in C++ (0.5 µs)
    y = F.linear(x_wide, _as(weight, wide), None if bias is None else _as(bias, wide))
    y.addmm_(xa, _as(lora_B, wide).t(), alpha=scaling)
    return _as(y, x.dtype), xa


def _grads(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    """``torch_backward``'s gradients, None where not needed (the eager Function's backward: an
    empty tensor for each would be an allocation, ≈1 µs, that the Function drops).

    ``scaling`` rides on GEMMs as ``addmm(t, a, b, beta=0, alpha=scaling)``, which is
    ``scaling·(a b)`` in one op (torch.addmm's documented beta=0: ``t`` only gives the shape, dtype
    and device, and is not read), where ``mm(a, b).mul_(scaling)`` is two: each saves ≈2 µs of a
    CPU call and one kernel launch on a GPU. ``t`` is a tensor at hand of the output's shape and
    dtype: ``xa`` [M, r] for ``g_xa``, ``lora_B`` in the wide dtype for ``grad_B``. ``g_xa`` carries
    the scaling once for both ``grad_x`` and ``grad_A``."""
    wide = xa.dtype
    gy_wide, x_wide = _as(gy, wide), _as(x, wide)
    B_wide = _as(lora_B, wide) if (need_x or need_A or need_B) else None
    grad_x = grad_A = grad_B = grad_bias = None
    if need_x or need_A:
        dropout_scale = _dropout_scale(x_wide, dropout_p, seed) if dropout_p else None
        g_xa = torch.addmm(xa, gy_wide, B_wide, beta=0, alpha=scaling)  # scaling·(gy B)
        A_wide = _as(lora_A, wide)
        if need_x:
            grad_x = gy_wide.mm(_as(weight, wide))
            if dropout_scale is None:
                grad_x = _as(grad_x.addmm_(g_xa, A_wide), x.dtype)
            else:
                grad_x = _as(grad_x.addcmul_(torch.mm(g_xa, A_wide), dropout_scale), x.dtype)
        if need_A:
            x_low_rank = x_wide * dropout_scale if dropout_scale is not None else x_wide
            grad_A = _as(torch.mm(g_xa.t(), x_low_rank), lora_A.dtype)
    if need_B:
        grad_B = _as(torch.addmm(B_wide, gy_wide.t(), xa, beta=0, alpha=scaling), lora_B.dtype)
    if need_bias:
        grad_bias = _as(gy_wide.sum(0), gy.dtype)
    return grad_x, grad_A, grad_B, grad_bias


def torch_backward(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    grad_x, grad_A, grad_B, grad_bias = _grads(
        gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias
    )
    return (
        _empty(x) if grad_x is None else grad_x,
        _empty(lora_A) if grad_A is None else grad_A,
        _empty(lora_B) if grad_B is None else grad_B,
        _empty(gy) if grad_bias is None else grad_bias,
    )


TORCH_OPS = register_backend("torch", torch_forward, torch_backward, eager_backward=_grads)
