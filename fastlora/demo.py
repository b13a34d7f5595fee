"""``fastlora demo``: build a ``FusedLoRALinear``, check its output and every gradient against the
float64 reference, and time it against the naive composition (``fastlora.reference``).

GPU: 2048 tokens through a 4096→4096 layer, r=16, bf16. CPU: 512 tokens, 1024→1024, r=16, fp32.
Exit code 1 when a check fails. ``fastlora bench`` is the thorough comparison.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._tolerance import rel_error, tolerance
from .bench.cases import LoRAInputs
from .bench.timing import Timed, time_steps
from .bench.workload import reference_results
from .ops.registry import resolve_backend
from .layers import FusedLoRALinear

SIZES = {"cuda": (2048, 4096, 4096, 16, "bf16", torch.bfloat16), "cpu": (512, 1024, 1024, 16, "fp32", torch.float32)}


def run_demo(device: str) -> int:
    M, K, N, r, dtype_name, dtype = SIZES[device]
    torch.manual_seed(0)
    layer = FusedLoRALinear(K, N, r=r, alpha=2 * r, device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(std=1 / math.sqrt(r))  # PEFT's zero init would make the check trivial
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    backend = resolve_backend(layer.backend, x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    print(f"fastlora demo on {device}: {layer}\n  resolved backend: {backend}; x: [{M}, {K}] {dtype_name}")

    inputs = LoRAInputs(x, layer.weight, layer.lora_A, layer.lora_B, dy, layer.bias, layer.scaling)
    expected = reference_results(inputs, "train", lora=True)
    y = layer(x)
    y.backward(dy)
    actual = {"y": y.detach(), "grad_x": x.grad, "grad_lora_A": layer.lora_A.grad, "grad_lora_B": layer.lora_B.grad}
    tol = tolerance(dtype, device)
    print(f"\ncheck against the float64 reference (relative error, tolerance {tol:.0e}):")
    passed = True
    for name, want in expected.items():
        err = rel_error(actual[name], want)
        passed &= err <= tol
        print(f"  {name:<12} {err:.2e}  {'ok' if err <= tol else 'FAIL'}")
    print("PASS" if passed else "FAIL")

    def naive(x):
        return reference.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)

    def train_step(fn):
        def step():
            x.grad = layer.lora_A.grad = layer.lora_B.grad = None
            fn(x).backward(dy)

        return step

    print(f"\nmedian time per call      {'fused':>10} {'naive':>10}  naive ÷ fused")
    for label, fused_step, naive_step in (
        ("forward", lambda: layer(x), lambda: naive(x)),
        ("training step (fwd+bwd)", train_step(layer), train_step(naive)),
    ):
        fused_ms, naive_ms = (t.median_ms for t in time_steps([Timed(fused_step), Timed(naive_step)], device))
        print(f"  {label:<23} {fused_ms:8.3f}ms {naive_ms:8.3f}ms  {naive_ms / fused_ms:.2f}×")
    return 0 if passed else 1
