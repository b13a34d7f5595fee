"""``backend="auto"`` over a 4-bit base weight: the fused QLoRA kernels run a problem class only
after passing the correctness gate (``fastlora.ops.gate``) against the dequantizing torch path.

A 4-bit problem class is the dense one (``auto.problem_key``) and the quant format (NF4/FP4, block
size, nested absmax). On its first call on a timed device (CUDA), both paths run on scratch inputs
of the call's shapes and dtypes over the call's own 4-bit weight (only read): the output and, when
gradients are needed, every gradient of the fused path must agree with the torch path's within
twice the tolerance table's bound, be finite, raise nothing and finish within the deadline. Without
dropout: each path draws its own mask. Passing, the fused path is taken (not timed against the torch
path: that one holds a dequantized copy of W per layer until the backward, which is what QLoRA
exists to avoid). Failing, the class runs the torch path, with one warning naming why; the verdict
is cached as ``auto``'s (in memory, and on disk unless the failure may be transient). On other
devices (the CPU, under the Triton interpreter) the fused path is taken unchecked, as before.
"""

from __future__ import annotations

import torch

from . import auto
from .candidates import qlora_candidates

_decided: dict[tuple, bool] = {}


def fused_4bit_passes(x: torch.Tensor, base, bias, lora_A, lora_B, dropout: float) -> bool:
    """Whether ``base`` (a ``qlora.Weight4bit``)'s fused kernels may run this call under
    ``backend="auto"``: True on devices ``auto`` does not time; else the gate's verdict for the
    problem class (False, a stopgap for one call, under CUDA-graph capture before it is known).
    Under ``torch.compile`` tracing: True, unchecked (timing cannot run in a trace)."""
    if x.device.type not in auto.TIMED_DEVICE_TYPES or torch.compiler.is_compiling():
        return True  # as before the gate (and a trace cannot measure): eager calls check it
    requires_grad = torch.is_grad_enabled() and (
        x.requires_grad or lora_A.requires_grad or lora_B.requires_grad or (bias is not None and bias.requires_grad)
    )  # fmt: skip
    state = base.weight.quant_state
    fast_key = (x.shape, lora_B.shape, x.dtype, lora_A.dtype, x.get_device(), dropout, requires_grad, bias is None,
                state.quant_type, state.blocksize, bool(state.nested))  # fmt: skip
    verdict = _decided.get(fast_key)
    if verdict is not None:
        return verdict
    nested = "/nested" if state.nested else ""
    key = f"4bit={state.quant_type}/{state.blocksize}{nested} " + auto.problem_key(x, lora_B, lora_A, dropout, requires_grad)
    names = ["torch", "triton"]
    build = lambda: qlora_candidates(x, base, bias, lora_A, lora_B, requires_grad)  # noqa: E731
    choice, settled = auto.settle(x.device, key, names, build, timed=False, prefer="triton", variant=bias is None)
    verdict = choice["backend"] == "triton"
    if settled:
        _decided[fast_key] = verdict
    return verdict


auto.on_clear.append(_decided.clear)  # auto.clear_memory forgets the verdicts with the entries
