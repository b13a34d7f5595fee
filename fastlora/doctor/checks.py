"""The correctness checks of ``fastlora doctor``, run in a child process, one backend per process.

``python -m fastlora.doctor.checks BACKEND DEVICE`` runs every problem of ``problems_for(BACKEND,
DEVICE)`` and prints one JSON line as each starts (``{"start": name}``) and one as it ends
(``{"problem": name, "ok": bool, "errors": {what: rel error}, "tolerance": t, "detail": text}``), so
that the parent names the problem a hang or a crash (an illegal address kills the process) struck.

Each problem: fresh random inputs; the backend's forward and every gradient (x, bias, lora_A,
lora_B, and weight where it requires grad) against ``fastlora.reference`` in float64, by the
tolerance table (``fastlora._tolerance``). Every buffer the Triton kernels write starts as NaN, so an
element left unwritten fails. Dropout: the mask is recovered from the backend itself (identity
adapters, no base: the layer returns ``D(x)``), checked for its kept fraction and scale, then used in
the float64 formula. ``triton-4bit`` is the fused QLoRA path over a bitsandbytes 4-bit weight,
against bitsandbytes' own dequantization in float64.

Test hooks (read here only): ``FASTLORA_DOCTOR_FAULT=<backend>:<kind>[:<problem>]`` makes this child
misbehave, for the tests of the parent: ``hang`` sleeps, ``abort`` kills the process as a CUDA fault
would, ``wrong`` adds noise of 10 % of its spread to the forward output.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import zlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton", "cuda", "triton-4bit")


class Problem(NamedTuple):
    """One check: x of leading shape ``lead`` and ``K`` features, N outputs, rank ``r``."""

    name: str
    lead: tuple
    K: int
    N: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype | None = None
    dropout: float = 0.0
    weight_grad: bool = False
    quant: str | None = None  # 4-bit: "nf4" or "fp4"
    blocksize: int = 64
    gpu_only: bool = False  # too slow for Triton's interpreter


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DENSE = [
    Problem("M1 K64 N48 r16 bf16", (1,), 64, 48, 16, BF16),
    Problem("M37 K45 N29 r1 fp16", (37,), 45, 29, 1, FP16),
    Problem("M2x37 K72 N40 r16 fp32 +grad W", (2, 37), 72, 40, 16, FP32, weight_grad=True),
    Problem("M37 K96 N80 r16 bf16, fp32 adapters", (37,), 96, 80, 16, BF16, FP32),
    Problem("M37 K45 N29 r8 bf16 dropout 0.25", (37,), 45, 29, 8, BF16, dropout=0.25),
    Problem("M300 K320 N384 r16 fp16", (300,), 320, 384, 16, FP16, gpu_only=True),
    Problem("M1000 K520 N264 r16 bf16, fp32 adapters", (1000,), 520, 264, 16, BF16, FP32, gpu_only=True),
]
FOUR_BIT = [
    Problem("M37 K200 N72 r16 bf16 nf4, fp32 adapters", (37,), 200, 72, 16, BF16, FP32, quant="nf4"),
    Problem("M1 K128 N96 r1 fp16 fp4", (1,), 128, 96, 1, FP16, quant="fp4", blocksize=128),
    Problem("M300 K384 N264 r16 bf16 nf4", (300,), 384, 264, 16, BF16, quant="nf4", gpu_only=True),
]


def problems_for(backend: str, device: str) -> list[Problem]:
    """The problems ``backend`` is checked on, on ``device`` (the large ones on a GPU only)."""
    problems = FOUR_BIT if backend == "triton-4bit" else DENSE
    return [p for p in problems if device == "cuda" or not p.gpu_only]


def _fault(backend: str, problem: str) -> str | None:
    """The test hook's fault for this problem, if any (see the module doc)."""
    spec = os.environ.get("FASTLORA_DOCTOR_FAULT", "")
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] != backend or (len(parts) == 3 and parts[2] not in problem):
        return None
    return parts[1]


def _poison() -> None:
    """Every buffer the Triton kernels fill starts as NaN (one allocator serves dense and 4-bit)."""
    from ..ops import _triton_common

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    _triton_common._empty = nan_empty


def _leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


def _inputs(p: Problem, device: str):
    x = torch.randn(*p.lead, p.K, device=device).to(p.dtype)
    weight = (torch.randn(p.N, p.K, device=device) / p.K**0.5).to(p.dtype)
    bias = torch.randn(p.N, device=device).to(p.dtype)
    adapters = p.adapter_dtype or p.dtype
    lora_A = (torch.randn(p.r, p.K, device=device) / p.K**0.5).to(adapters)
    lora_B = (torch.randn(p.N, p.r, device=device) / p.r**0.5).to(adapters)
    return _leaf(x), _leaf(weight, p.weight_grad), _leaf(bias), _leaf(lora_A), _leaf(lora_B)


def _dense_call(backend: str):
    import fastlora

    def call(x, weight, bias, lora_A, lora_B, scaling, dropout):
        return fastlora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout=dropout, backend=backend)

    return call


def _recover_mask(call, p: Problem, device: str, seed: int) -> torch.Tensor:
    """The 0/1 keep mask the backend draws on an x of ``p``'s shape after ``manual_seed(seed)``."""
    x = torch.rand(*p.lead, p.K, device=device, dtype=torch.float64).add_(0.5).to(p.dtype)  # no zeros
    eye = torch.eye(p.K, device=device, dtype=p.adapter_dtype or p.dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = call(x, torch.zeros(p.K, p.K, device=device, dtype=p.dtype), None, eye, eye, 1.0, p.dropout)
    kept = out != 0
    expected = x.double() / (1 - p.dropout)
    if not torch.allclose(out[kept].double(), expected[kept], rtol=1e-2 if p.dtype != FP32 else 1e-5):
        raise AssertionError("dropout: kept elements are not scaled by 1/(1-p)")
    fraction = kept.double().mean().item()
    # n Bernoulli(1-p) draws: the kept fraction lies within 6 sigma of 1 - p.
    sigma = (p.dropout * (1 - p.dropout) / kept.numel()) ** 0.5
    if abs(fraction - (1 - p.dropout)) > 6 * sigma:
        raise AssertionError(f"dropout: kept fraction {fraction:.3f}, expected {1 - p.dropout:.3f}")
    return kept.double()


def _quantized(p: Problem, device: str):
    """A random bitsandbytes 4-bit layer computing in ``p.dtype`` and its W as bitsandbytes dequantizes it."""
    from .. import qlora

    linear = torch.nn.Linear(p.K, p.N, bias=True, device=device, dtype=p.dtype)
    layer = qlora.quantize_linear(linear, p.quant, p.blocksize, True, compute_dtype=p.dtype)
    W64 = qlora.bitsandbytes().functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    return qlora.base_weight(layer.weight, p.dtype), W64


def check(backend: str, p: Problem, device: str) -> dict:
    """``{"ok", "errors", "tolerance", "detail"}`` of ``backend`` on problem ``p``."""
    from .. import reference
    from .._tolerance import rel_error, tolerance

    torch.manual_seed(zlib.crc32(p.name.encode()))  # fresh per problem, the same every run
    fault = _fault(backend, p.name)
    if fault == "hang":
        time.sleep(3600)
    if fault == "abort":
        os.abort()
    x, weight, bias, lora_A, lora_B = _inputs(p, device)
    scaling = 1.5
    if p.quant:
        base, W64 = _quantized(p, device)
        W64 = W64.requires_grad_(False)

        def call(x, weight, bias, lora_A, lora_B, scaling, dropout):
            return base.lora_linear(x, bias, lora_A, lora_B, scaling, dropout, "triton")
    else:
        W64, call = weight.detach().double().requires_grad_(p.weight_grad), _dense_call(backend)
    keep, seed = None, 1234
    if p.dropout:
        keep = _recover_mask(call, p, device, seed)
    torch.manual_seed(seed)
    out = call(x, weight, bias, lora_A, lora_B, scaling, p.dropout)
    if fault == "wrong":
        out = out + 0.1 * out.detach().double().std().item() * torch.randn_like(out)

    x64, b64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, bias, lora_A, lora_B))
    if keep is None:
        ref = reference.lora_linear(x64, W64, b64, A64, B64, scaling)
    else:
        ref = F.linear(x64, W64, b64) + scaling * F.linear(F.linear(x64 * keep / (1 - p.dropout), A64), B64)
    tol = tolerance(p.dtype, device)
    errors = {"forward": rel_error(out, ref)}
    if out.dtype != x.dtype or out.shape != ref.shape:
        return {"ok": False, "errors": errors, "tolerance": tol, "detail": f"output {out.dtype} {tuple(out.shape)}"}
    names = ["x", "bias", "lora_A", "lora_B"] + (["weight"] if p.weight_grad else [])
    ours = [x, bias, lora_A, lora_B] + ([weight] if p.weight_grad else [])
    theirs = [x64, b64, A64, B64] + ([W64] if p.weight_grad else [])
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, ours, gy)
    grads64 = torch.autograd.grad(ref, theirs, gy.double())
    wrong_dtype = [n for n, g, t in zip(names, grads, ours) if g.dtype != t.dtype]
    errors.update({f"grad {n}": rel_error(g, g64) for n, g, g64 in zip(names, grads, grads64)})
    bad = [f"{what} {err:.2e}" for what, err in errors.items() if not err <= tol]  # NaN fails
    detail = "; ".join(bad + [f"grad {n} has the wrong dtype" for n in wrong_dtype])
    return {"ok": not detail, "errors": errors, "tolerance": tol, "detail": detail or "ok"}


def unavailable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot be checked on ``device`` here, or None."""
    import fastlora
    from ..ops.registry import backend_ops

    name = "triton" if backend == "triton-4bit" else backend
    status = fastlora.available_backends()[name]
    if not status.available:
        return status.detail
    if backend == "triton-4bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pip install 'fastlora[qlora]')"
        if device != "cuda":
            return "the 4-bit check runs on a GPU only (bitsandbytes' CPU dequantization differs from its CUDA one)"
    runs_on = backend_ops(name).runs_on
    if runs_on is not None and device not in runs_on:
        hint = " (set TRITON_INTERPRET=1 to check it under Triton's interpreter, slowly)" if name == "triton" else ""
        return f"it runs on {'/'.join(runs_on)} tensors and this check runs on {device}{hint}"
    if name == "cuda":
        from ..ops.cuda_lora import device_unsupported

        return device_unsupported(torch.device(device))
    return None


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv: list[str]) -> int:
    backend, device = argv
    reason = unavailable(backend, device)
    if reason is not None:
        _emit({"unavailable": reason})
        return 0
    if backend != "torch":
        _poison()
    for p in problems_for(backend, device):
        _emit({"start": p.name})
        try:
            result = check(backend, p, device)
            if device == "cuda":
                torch.cuda.synchronize()  # an asynchronous fault is this problem's
        except Exception as err:  # a backend's failure is the verdict, not the child's end
            last = traceback.extract_tb(err.__traceback__)[-1]
            where = f" at {os.path.basename(last.filename)}:{last.lineno}"
            result = {"ok": False, "errors": {}, "tolerance": None, "detail": f"raised {type(err).__name__}: {err}{where}"[:600]}
        _emit({"problem": p.name, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
