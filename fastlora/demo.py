"""``fastlora demo``: build a ``FusedLoRALinear``, check its output and every gradient against the
float64 reference, and time it against the naive composition (``fastlora.reference``).

GPU: 2048 tokens through a 4096→4096 layer, r=16, bf16. CPU: 512 tokens, 1024→1024, r=16, fp32.
The timing is repeated (each repeat: interleaved rounds of both, its median call) and the spread of
the repeats is printed; a difference is reported only where, in every repeat, the two's quartiles
over the calls are apart, else it is called noise. Exit code 1 when a check fails.
``fastlora bench`` is the thorough comparison.
"""

from __future__ import annotations

import math
import os
import statistics

import torch

from . import reference
from ._tolerance import rel_error, tolerance
from .bench.cases import LoRAInputs
from .bench.timing import Timed, Timing, time_steps
from .bench.workload import reference_results
from .ops.dispatch import resolve_backend
from .layers import FusedLoRALinear

SIZES = {"cuda": (2048, 4096, 4096, 16, "bf16", torch.bfloat16), "cpu": (512, 1024, 1024, 16, "fp32", torch.float32)}


def _spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def _verdict(fused: list[Timing], naive: list[Timing]) -> str:
    """A difference counts only where, in every repeat, the calls' interquartile ranges are apart."""
    if all(f.q3_ms < n.q1_ms for f, n in zip(fused, naive)):
        return "fused faster (in every repeat its calls' quartiles lie below naive's)"
    if all(n.q3_ms < f.q1_ms for f, n in zip(fused, naive)):
        return "naive faster (in every repeat its calls' quartiles lie below fused's)"
    return "within the noise (the two overlap in at least one repeat)"


def _busy_cpu() -> str | None:
    """A note when other processes compete for the cores: CPU times then scatter."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load average {load:.1f} on {cores} cores: other processes compete, times scatter" if load > cores else None


def run_demo(device: str, repeats: int = 5) -> int:
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

    print(f"\ntime per call over {repeats} repeats, min / median / max of each repeat's median call:")
    busy = _busy_cpu() if device == "cpu" else None
    if busy:
        print(f"  (note: {busy})")
    for label, fused_step, naive_step in (
        ("forward", lambda: layer(x), lambda: naive(x)),
        ("training step (fwd+bwd)", train_step(layer), train_step(naive)),
    ):
        runs = [time_steps([Timed(fused_step), Timed(naive_step)], device) for _ in range(repeats)]
        fused, plain = [f for f, _ in runs], [n for _, n in runs]
        fused_ms, naive_ms = [t.median_ms for t in fused], [t.median_ms for t in plain]
        ratios = [n / f for n, f in zip(naive_ms, fused_ms)]
        print(f"  {label}\n    fused {_spread(fused_ms, '.3f')} ms   naive {_spread(naive_ms, '.3f')} ms")
        print(f"    naive ÷ fused {_spread(ratios, '.2f')} → {_verdict(fused, plain)}")
    return 0 if passed else 1
