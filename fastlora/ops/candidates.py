"""The candidates ``auto``'s gate runs (``fastlora.ops.gate.Candidate``): each backend's step on
scratch copies of a call, built once per measured problem class.

Scratch inputs have the call's shapes, dtypes, devices and strides and random values from a private
generator; the caller's tensors are never written (a frozen base weight, dense or 4-bit, which every
path only reads, is used in place rather than copied on a possibly full GPU). A step zeroes the
scratch leaves' gradients (as ``zero_grad(set_to_none=True)``: no accumulation timed), runs the
forward with ``scaling`` 0.5 and, when gradients are needed, the backward of a random ``gy``, and
returns ``{"y": y, "grad_<input>": gradient or None, ...}``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .gate import Candidate
from .registry import backend_ops


def scratch_like(t: torch.Tensor | None, generator: torch.Generator, requires_grad: bool) -> torch.Tensor | None:
    """A tensor of ``t``'s shape, dtype, device and strides, random, not ``t``; a leaf that requires
    grad if asked."""
    if t is None:
        return None
    values = torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32)
    scratch = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(values)
    return scratch.requires_grad_(requires_grad)


_GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias", "grad_A", "grad_B")


def dense_candidates(names, x, weight, bias, lora_A, lora_B, dropout, requires_grad) -> dict[str, Candidate]:
    """Each backend's step on scratch copies of the call: ``check`` without dropout (each backend
    draws its own mask), ``run`` with the call's dropout when it has one."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    inputs = (x, weight, bias, lora_A, lora_B)
    # What needs a gradient is the call's, or for explain_backend's bare question the adapters'.
    needs = [t is not None and t.requires_grad for t in inputs]
    if requires_grad and not any(needs):
        needs[3] = needs[4] = True
    args = [scratch_like(t, generator, requires_grad and need) for t, need in zip(inputs, needs)]
    if not needs[1]:
        # A frozen weight (LoRA's case) is only read by every backend: time on it in place
        # rather than holding a second copy of the largest tensor on a possibly full GPU.
        args[1] = weight.detach()
    gy = torch.randn((*x.shape[:-1], weight.shape[0]), generator=generator, device=x.device).to(x.dtype)
    gy2d = gy.reshape(-1, weight.shape[0])

    def step(ops, p: float) -> Callable[[], dict]:
        seed = torch.tensor(0, dtype=torch.int64) if p else None

        def run() -> dict:
            for leaf in args:  # as zero_grad(set_to_none=True): no accumulation kernels timed
                if leaf is not None:
                    leaf.grad = None
            with torch.set_grad_enabled(requires_grad):
                y = ops.function.apply(args[0].reshape(-1, x.shape[-1]), *args[1:], 0.5, p, seed)
                if requires_grad:
                    torch.autograd.backward(y, gy2d)
            grads = {n: (t.grad if t is not None else None) for n, t in zip(_GRAD_NAMES, args)} if requires_grad else {}
            return {"y": y, **grads}

        return run

    return {name: Candidate(step(backend_ops(name), 0.0), step(backend_ops(name), dropout) if dropout else None) for name in names}


_QLORA_GRADS = ("grad_x", "grad_bias", "grad_A", "grad_B")


def qlora_candidates(x, base, bias, lora_A, lora_B, requires_grad) -> dict[str, Candidate]:
    """Both paths' steps on scratch inputs over ``base``'s weight: the fused kernels, and the torch
    backend on W dequantized once (as the unfused path dequantizes it)."""
    from .triton_qlora import qlora_linear_2d

    generator = torch.Generator(device=x.device).manual_seed(0)
    K, N = x.shape[-1], lora_B.shape[0]
    args = [scratch_like(t, generator, requires_grad) for t in (x, bias, lora_A, lora_B)]
    gy = torch.randn((*x.shape[:-1], N), generator=generator, device=x.device).to(x.dtype)
    gy2d = gy.reshape(-1, N)
    quant, W = base.quant(), base.dequantized(x.dtype)
    torch_ops = backend_ops("torch")

    def step(forward):
        def run() -> dict:
            for leaf in args:
                if leaf is not None:
                    leaf.grad = None
            with torch.set_grad_enabled(requires_grad):
                y = forward(args[0].reshape(-1, K), *args[1:])
                if requires_grad:
                    torch.autograd.backward(y, gy2d)
            grads = {n: (t.grad if t is not None else None) for n, t in zip(_QLORA_GRADS, args)} if requires_grad else {}
            return {"y": y, **grads}

        return run

    return {
        "torch": Candidate(step(lambda x2d, b, A, B: torch_ops.function.apply(x2d, W, b, A, B, 0.5, 0.0, None))),
        "triton": Candidate(step(lambda x2d, b, A, B: qlora_linear_2d(x2d, quant, b, A, B, 0.5, 0.0, None))),
    }
