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
    dtype = x.dtype
    wide = wide_dtype(dtype)
    if dtype != wide or lora_A.dtype != wide:  # weight and bias are in x's dtype, lora_B in lora_A's
        x, weight, lora_A, lora_B = _as(x, wide), _as(weight, wide), _as(lora_A, wide), _as(lora_B, wide)
        bias = None if bias is None else _as(bias, wide)
    x_low_rank = x * _dropout_scale(x, dropout_p, seed) if dropout_p else x
    xa = F.linear(x_low_rank, lora_A)  # = mm(x, Aᵀ), with the transpose in C++ (0.5 µs)
    y = F.linear(x, weight, bias)
    y.addmm_(xa, lora_B.t(), alpha=scaling)
    return _as(y, dtype), xa


def _grads(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    """``torch_backward``'s gradients, None where not needed (the eager Function's backward: an
    empty tensor for each would be an allocation, ≈1 µs, that the Function drops). Inputs in
    fp32/fp64 throughout (the usual CPU call) go straight to ``_wide_grads``: the casts' checks
    are a dozen Python calls, ≈1 µs."""
    wide = xa.dtype
    if gy.dtype == wide and x.dtype == wide and lora_A.dtype == wide:  # weight in x's, lora_B in lora_A's dtype
        return _wide_grads(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias)
    need_low_rank = need_x or need_A
    grad_x, grad_A, grad_B, grad_bias = _wide_grads(
        _as(gy, wide), _as(x, wide) if need_low_rank else x, xa, _as(weight, wide) if need_x else weight,
        _as(lora_A, wide) if need_low_rank else lora_A, _as(lora_B, wide) if (need_low_rank or need_B) else lora_B,
        scaling, dropout_p, seed, need_x, need_A, need_B, need_bias,
    )  # fmt: skip
    return (
        None if grad_x is None else _as(grad_x, x.dtype),
        None if grad_A is None else _as(grad_A, lora_A.dtype),
        None if grad_B is None else _as(grad_B, lora_B.dtype),
        None if grad_bias is None else _as(grad_bias, gy.dtype),
    )


def _wide_grads(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    """``_grads`` with every tensor it reads in ``xa``'s dtype.

    ``scaling`` rides on GEMMs as ``addmm(t, a, b, beta=0, alpha=scaling)``, which is
    ``scaling·(a b)`` in one op (torch.addmm's documented beta=0: ``t`` only gives the shape, dtype
    and device, and is not read), where ``mm(a, b).mul_(scaling)`` is two: each saves ≈2 µs of a
    CPU call and one kernel launch on a GPU. ``t`` is a tensor at hand of the output's shape and
    dtype: ``xa`` [M, r] for ``g_xa``, ``lora_B`` for ``grad_B``. ``g_xa`` carries the scaling
    once for both ``grad_x`` and ``grad_A``."""
    grad_x = grad_A = grad_B = grad_bias = None
    if need_x or need_A:
        dropout_scale = _dropout_scale(x, dropout_p, seed) if dropout_p else None
        g_xa = torch.addmm(xa, gy, lora_B, beta=0, alpha=scaling)  # scaling·(gy B)
        if need_x:
            grad_x = gy.mm(weight)
            if dropout_scale is None:
                grad_x.addmm_(g_xa, lora_A)
            else:
                grad_x.addcmul_(torch.mm(g_xa, lora_A), dropout_scale)
        if need_A:
            grad_A = torch.mm(g_xa.t(), x if dropout_scale is None else x * dropout_scale)
    if need_B:
        grad_B = torch.addmm(lora_B, gy.t(), xa, beta=0, alpha=scaling)
    if need_bias:
        grad_bias = gy.sum(0)
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
