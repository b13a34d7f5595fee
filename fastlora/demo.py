"""``fastlora demo``: build a ``FusedLoRALinear``, check its output and every gradient against the
float64 reference, and time it against the naive composition (``fastlora.reference``).

GPU: 2048 tokens through a 4096→4096 layer, r=16, bf16. CPU: 512 tokens, 1024→1024, r=16, fp32.
The timing is repeated (each repeat: interleaved rounds of both, its median call) and the spread of
the repeats is printed: a ratio whose repeats fall on both sides of 1 is reported as noise, not as
a speed-up. Exit code 1 when a check fails. ``fastlora bench`` is the thorough comparison.
"""

from __future__ import annotations

import math
import statistics

import torch

from . import reference
from .backends import resolve_backend
from .bench.cases import LoRAInputs
from .bench.timing import Timed, time_steps
from .bench.workload import reference_results, rel_error
from .layers import FusedLoRALinear

# The tests' bounds (tests/helpers.py); the one line to point at the project's tolerance table.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}
SIZES = {"cuda": (2048, 4096, 4096, 16, "bf16", torch.bfloat16), "cpu": (512, 1024, 1024, 16, "fp32", torch.float32)}


def _spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def _verdict(ratios: list[float]) -> str:
    if min(ratios) > 1:
        return "fused faster in every repeat"
    if max(ratios) < 1:
        return "naive faster in every repeat"
    return "within the noise (the repeats fall on both sides of 1)"


def run_demo(device: str, repeats: int = 5) -> int:
    M, K, N, r, dtype_name, dtype = SIZES[device]
    torch.manual_seed(0)
    layer = FusedLoRALinear(K, N, r=r, alpha=2 * r, device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(std=1 / math.sqrt(r))  # PEFT's zero init would make the check trivial
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    backend = resolve_backend(layer.backend, x, r)
    print(f"fastlora demo on {device}: {layer}\n  resolved backend: {backend}; x: [{M}, {K}] {dtype_name}")

    inputs = LoRAInputs(x, layer.weight, layer.lora_A, layer.lora_B, dy, layer.bias, layer.scaling)
    expected = reference_results(inputs, "train", lora=True)
    y = layer(x)
    y.backward(dy)
    actual = {"y": y.detach(), "grad_x": x.grad, "grad_lora_A": layer.lora_A.grad, "grad_lora_B": layer.lora_B.grad}
    tolerance = TOLERANCE[dtype_name]
    print(f"\ncheck against the float64 reference (relative error, tolerance {tolerance:.0e}):")
    passed = True
    for name, want in expected.items():
        err = rel_error(actual[name], want)
        passed &= err <= tolerance
        print(f"  {name:<12} {err:.2e}  {'ok' if err <= tolerance else 'FAIL'}")
    print("PASS" if passed else "FAIL")

    def naive(x):
        return reference.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)

    def train_step(fn):
        def step():
            x.grad = layer.lora_A.grad = layer.lora_B.grad = None
            fn(x).backward(dy)

        return step

    print(f"\ntime per call over {repeats} repeats, min / median / max:")
    for label, fused_step, naive_step in (
        ("forward", lambda: layer(x), lambda: naive(x)),
        ("training step (fwd+bwd)", train_step(layer), train_step(naive)),
    ):
        fused_ms, naive_ms = [], []
        for _ in range(repeats):
            fused, plain = time_steps([Timed(fused_step), Timed(naive_step)], device)
            fused_ms.append(fused.median_ms)
            naive_ms.append(plain.median_ms)
        ratios = [n / f for n, f in zip(naive_ms, fused_ms)]
        print(f"  {label}\n    fused {_spread(fused_ms, '.3f')} ms   naive {_spread(naive_ms, '.3f')} ms")
        print(f"    naive ÷ fused {_spread(ratios, '.2f')} → {_verdict(ratios)}")
    return 0 if passed else 1
