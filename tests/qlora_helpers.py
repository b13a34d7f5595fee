"""Shared by the QLoRA tests (``test_qlora*.py``, which import bitsandbytes first): fresh random
bitsandbytes 4-bit layers, W as bitsandbytes dequantizes it, and the check of the fused layer
against the float64 reference (``fastlora.reference``) over that W."""

import bitsandbytes as bnb
import torch
from helpers import rel_error

import fastlora
from fastlora import qlora

BACKEND = "triton" if fastlora.available_backends()["triton"].available else "torch"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantized(in_features, out_features, dtype, quant_type="nf4", blocksize=64, nested=True, bias=True):
    """A fresh random bitsandbytes ``Linear4bit`` computing in ``dtype`` and its W as bitsandbytes
    dequantizes it (float64)."""
    linear = torch.nn.Linear(in_features, out_features, bias=bias, device=DEVICE, dtype=dtype)
    layer = qlora.quantize_linear(linear, quant_type, blocksize, nested, compute_dtype=dtype)
    layer.support_avx512bf16_for_cpu = False  # else bitsandbytes repacks W in place for its CPU kernel
    return layer, bnb_dequantize(layer.weight).to(dtype).double()


def bnb_dequantize(weight):
    """W as bitsandbytes dequantizes it. On the CPU, with its default (device-independent, CUDA-
    equivalent) implementation: 0.50.2's CPU C kernel indexes absmax by row and is wrong where quant
    blocks straddle rows (0.2 absolute error at K = 96, blocksize 64, against its own quantize_4bit)."""
    state = weight.quant_state
    if weight.device.type == "cuda":
        return bnb.functional.dequantize_4bit(weight.data, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    code = bnb.functional.get_4bit_type(state.quant_type, device="cpu")
    eager = _dequantize_4bit_compute.__wrapped__  # bitsandbytes wraps it in torch.compile
    packed = weight.data.view(torch.uint8).reshape(-1)
    return eager(packed, absmax.float(), code, state.blocksize, state.shape, state.dtype)


def adapters(in_features, out_features, r, dtype):
    A = (torch.randn(r, in_features, device=DEVICE) / in_features**0.5).to(dtype).requires_grad_()
    B = (torch.randn(out_features, r, device=DEVICE) / r**0.5).to(dtype).requires_grad_()
    return A, B


def fused(layer, x, bias, A, B, scaling, dropout=0.0, backend=BACKEND):
    return qlora.base_weight(layer.weight, layer.compute_dtype).lora_linear(x, bias, A, B, scaling, dropout, backend)


def check(layer, W64, x, bias, A, B, scaling, tol):
    """Forward and the gradients of x, bias, A, B against the float64 reference over bitsandbytes' W."""
    out = fused(layer, x, bias, A, B, scaling)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], W64.shape[0])
    inputs = [t for t in (x, bias, A, B) if t is not None]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    x64, *rest = inputs64
    bias64 = rest.pop(0) if bias is not None else None
    ref = fastlora.reference.lora_linear(x64, W64, bias64, *rest, scaling)
    assert rel_error(out, ref) <= tol, f"forward: {rel_error(out, ref):.2e}"
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, gy)
    grads64 = torch.autograd.grad(ref, inputs64, gy.double())
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.dtype == inputs[i].dtype
        assert rel_error(g, g64) <= tol, f"grad {i}: {rel_error(g, g64):.2e}"
