"""Shared test utilities: input factories, float64 references (the tolerance table is fastlora._tolerance's)."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora._tolerance import rel_error, tolerance  # noqa: F401  (re-exported to the tests)
from fastlora.ops.registry import backend_ops

try:
    from fastlora.ops import _triton_common
except ImportError:  # no triton here: nothing to poison
    _triton_common = None

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_on(device: str) -> list[str]:
    """Every backend that can run on ``device`` here (triton on the CPU under the interpreter)."""
    runnable = []
    for name, status in fastlora.available_backends().items():
        if status.available:
            ops = backend_ops(name)
            if ops.runs_on is None or torch.device(device).type in ops.runs_on:
                runnable.append(name)
    return runnable


BACKEND_DEVICE = [
    pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else [])
    for d in DEVICES
    for b in backends_on(d)
]


def make_inputs(
    m_shape,
    in_features: int,
    out_features: int,
    r: int,
    dtype: torch.dtype,
    device="cpu",
    *,
    bias: bool = True,
    adapter_dtype: torch.dtype | None = None,
    x_noncontiguous: bool = False,
    weight_requires_grad: bool = False,
):
    """Fresh random ``(x, weight, bias, lora_A, lora_B)``, scaled so every term of y matters.

    ``m_shape`` is the leading shape of x (an int for 2-D x). x, bias, lora_A and lora_B require grad.
    """
    lead = (m_shape,) if isinstance(m_shape, int) else tuple(m_shape)
    adapter_dtype = adapter_dtype or dtype
    if x_noncontiguous:  # every other column of a twice-as-wide tensor: a strided, non-contiguous view
        x = torch.randn(*lead, 2 * in_features, device=device, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(*lead, in_features, device=device, dtype=dtype)
    weight = (torch.randn(out_features, in_features, device=device) / in_features**0.5).to(dtype)
    b = torch.randn(out_features, device=device, dtype=dtype) if bias else None
    lora_A = (torch.randn(r, in_features, device=device) / in_features**0.5).to(adapter_dtype)
    lora_B = (torch.randn(out_features, r, device=device) / r**0.5).to(adapter_dtype)
    for t in (x, b, lora_A, lora_B):
        if t is not None:
            t.requires_grad_(True)
    weight.requires_grad_(weight_requires_grad)
    return x, weight, b, lora_A, lora_B


def _float64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def check_against_reference(inputs, scaling: float, backend: str, *, tol: float | None = None) -> None:
    """Forward and every input gradient of ``lora_linear(backend)`` vs the float64 reference."""
    x = inputs[0]
    tol = tol if tol is not None else tolerance(x.dtype, x.device)
    out = fastlora.lora_linear(*inputs, scaling, backend=backend)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], inputs[1].shape[0])
    inputs64 = [_float64(t) for t in inputs]
    ref = fastlora.reference.lora_linear(*inputs64, scaling)
    assert rel_error(out, ref) <= tol, f"forward: {rel_error(out, ref):.3e} > {tol}"

    grad_out = torch.randn_like(out)
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out)
    grads64 = torch.autograd.grad(ref, [inputs64[i] for i in wanted], grad_out.double())
    names = ["x", "weight", "bias", "lora_A", "lora_B"]
    for i, g, g64 in zip(wanted, grads, grads64):
        assert g.dtype == inputs[i].dtype, f"grad of {names[i]} has dtype {g.dtype}"
        assert rel_error(g, g64) <= tol, f"grad of {names[i]}: {rel_error(g, g64):.3e} > {tol}"


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every buffer the Triton kernels write with NaN first, so an unwritten element fails."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    if _triton_common is not None:  # one allocator serves both Triton op modules (dense and 4-bit)
        monkeypatch.setattr(_triton_common, "_empty", nan_empty)


def train_losses(model, batches) -> torch.Tensor:
    """The loss of each AdamW step (lr 1e-2, the model's trainable parameters) of a causal LM over
    ``batches`` of token ids, each its own labels."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    curve = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve)


def spy_on_launches(monkeypatch, during_launch=None) -> list[str]:
    """The names of the Triton kernels launched from now on (under ``TRITON_INTERPRET=1``); a launch
    made outside ``_triton_common.on_device`` fails its test. Every fastlora module holding
    ``on_device`` gets a wrapper that marks the block, and the interpreter's ``run`` checks the mark.
    ``during_launch``: a ``threading.local`` whose ``depth`` is raised while a kernel runs (so that a
    dispatch counter can leave the interpreted kernel's own torch ops out)."""
    import contextlib
    import sys
    import threading

    from triton.runtime.interpreter import InterpretedFunction

    from fastlora.ops import _triton_common

    guard, launches = threading.local(), []
    original_on_device, original_run = _triton_common.on_device, InterpretedFunction.run

    @contextlib.contextmanager
    def marking_on_device(device):
        with original_on_device(device):
            guard.depth = getattr(guard, "depth", 0) + 1
            try:
                yield
            finally:
                guard.depth -= 1

    for name, module in list(sys.modules.items()):
        if name.startswith("fastlora.") and getattr(module, "on_device", None) is original_on_device:
            monkeypatch.setattr(module, "on_device", marking_on_device)

    def checked_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        assert getattr(guard, "depth", 0) > 0, f"{self.fn.__name__} was launched outside on_device"
        if during_launch is None:
            return original_run(self, *args, **kwargs)
        during_launch.depth = getattr(during_launch, "depth", 0) + 1
        try:
            return original_run(self, *args, **kwargs)
        finally:
            during_launch.depth -= 1

    monkeypatch.setattr(InterpretedFunction, "run", checked_run)
    return launches
