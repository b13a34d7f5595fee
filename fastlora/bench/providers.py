"""The provider registry: every implementation of the LoRA linear layer that is benchmarked.

A provider turns one set of ``LoRAInputs`` into a ``Layer``: a callable ``x → y`` plus the adapter
tensors whose ``.grad`` the backward fills (PEFT's layout, ``lora_A [r, K]``, ``lora_B [N, r]``).
All share the inputs' frozen ``weight`` (no copy); ``peft-fp32`` holds float32 copies of the
adapters, as PEFT does by default.

``base``             the frozen linear layer alone, ``F.linear(x, W)``: the yardstick of every ratio.
``naive``            ``linear(x) + scaling·(x Aᵀ) Bᵀ`` as three autograd ops: ``fastlora.reference``,
                     the composition of Raschka's ``LinearWithLoRA`` in PEFT's layout.
``peft``             HuggingFace PEFT's ``lora.Linear``, adapters in the activation dtype.
``peft-fp32``        the same with PEFT's default float32 adapters (half dtypes only).
``addmm``            Unsloth's composition: ``y = x Wᵀ; y.addmm_(x Aᵀ, Bᵀ)``, hand-written backward.
``fastlora-triton``, ``fastlora-cuda``, ``fastlora-torch``   ``fastlora.lora_linear(..., backend=...)``.
``fastlora-auto``    ``backend="auto"``, the default; its note names the backend auto picked and why.
``compiled``         ``torch.compile`` of ``naive`` (compiled afresh for each case).
``peft-qlora``       PEFT's ``lora.bnb.Linear4bit`` over a bitsandbytes ``Linear4bit`` (NF4, blocksize 64,
                     double-quantized absmax: the QLoRA recipe), float32 adapters, as users run it.
``fastlora-qlora``   the same 4-bit layer patched by ``fastlora.patch_peft`` (W dequantized in-tile).
                     Both 4-bit providers are checked against the reference on W's dequantization.
``peft-dora``        PEFT's ``lora.Linear`` with ``use_dora=True`` (DoRA), adapters in the activation dtype.
``fastlora-dora``    ``fastlora.dora.dora_linear`` (backend "auto") on the same tensors: what ``patch_peft``
                     runs for a DoRA layer. Both DoRA providers start from PEFT's initialisation
                     ``m = ‖W + s·B A‖`` (m/n = 1), where DoRA's output and x/A/B gradients equal LoRA's,
                     so the LoRA reference checks them; the magnitude's gradient (not checked here) is
                     checked against PEFT in tests/test_dora.py. Every DoRA op runs whatever m/n is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..functional import lora_linear
from ..ops.auto import explain_backend
from ..ops.registry import available_backends
from .cases import Case, LoRAInputs


class Unavailable(Exception):
    """The provider cannot run this case on this machine; the message says why."""


def describe(err: BaseException) -> str:
    """``"TypeName: first line of the message"``."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


@dataclass
class Layer:
    forward: Callable[[torch.Tensor], torch.Tensor]
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    describe: Callable[[], str] | None = None  # a note for the report, asked after the layer ran
    magnitude: torch.Tensor | None = None  # DoRA's m: its .grad is cleared with the adapters'

    @property
    def adapters(self) -> dict[str, torch.Tensor]:
        pairs = (("lora_A", self.lora_A), ("lora_B", self.lora_B), ("magnitude", self.magnitude))
        return {name: t for name, t in pairs if t is not None}


@dataclass(frozen=True)
class Provider:
    """``build`` makes a ``Layer`` of one input set; ``unavailable`` returns why a case cannot run,
    or None; ``start_case`` runs once before a case's layers are built."""

    name: str
    build: Callable[[LoRAInputs], Layer]
    unavailable: Callable[[Case], str | None] = lambda case: None
    start_case: Callable[[], None] = lambda: None
    lora: bool = True  # False: computes the base layer only (``base``)
    # The inputs as the provider stores them, which the float64 reference is computed on (None: as given).
    reference_inputs: Callable[[LoRAInputs], LoRAInputs] | None = None


def _base(inp: LoRAInputs) -> Layer:
    return Layer(lambda x: F.linear(x, inp.weight, inp.bias))


def _naive(inp: LoRAInputs) -> Layer:
    def forward(x):
        return reference.lora_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)

    return Layer(forward, inp.lora_A, inp.lora_B)


class _AddmmLoRA(torch.autograd.Function):
    """Unsloth's ``matmul_lora`` and ``LoRA_W`` backward, for 2-D ``x`` and frozen ``W``, ``bias``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        xa = x @ lora_A.t()
        y = F.linear(x, weight, bias).addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        dy_b = dy @ lora_B
        grad_x = (dy @ weight).addmm_(dy_b, lora_A, alpha=s)
        grad_A = (dy_b.t() @ x).mul_(s)
        grad_B = (dy.t() @ xa).mul_(s)
        return grad_x, None, None, grad_A, grad_B, None


def _addmm(inp: LoRAInputs) -> Layer:
    def forward(x):
        return _AddmmLoRA.apply(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)

    return Layer(forward, inp.lora_A, inp.lora_B)


def _peft_layer(inp: LoRAInputs, adapter_dtype: torch.dtype, use_dora: bool = False):
    """PEFT's ``lora.Linear`` over an ``nn.Linear`` sharing ``W`` (frozen), the adapters copied from
    the inputs in ``adapter_dtype``, scaling ``lora_alpha / r`` equal to the inputs': ``(layer,
    lora_A, lora_B)``."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoRALinear

    N, K = inp.weight.shape
    r = inp.lora_A.shape[0]
    base = nn.Linear(K, N, bias=inp.bias is not None, device="meta")
    base.weight = nn.Parameter(inp.weight, requires_grad=False)
    if inp.bias is not None:
        base.bias = nn.Parameter(inp.bias, requires_grad=False)
    config = LoraConfig(r=r, lora_alpha=inp.scaling * r, use_dora=use_dora)
    layer = PeftLoRALinear(base, "default", config=config, r=r, lora_alpha=inp.scaling * r)
    lora_A = layer.lora_A["default"].weight = nn.Parameter(inp.lora_A.detach().to(adapter_dtype, copy=True))
    lora_B = layer.lora_B["default"].weight = nn.Parameter(inp.lora_B.detach().to(adapter_dtype, copy=True))
    return layer, lora_A, lora_B


def _peft_builder(adapter_dtype: torch.dtype | None) -> Callable[[LoRAInputs], Layer]:
    """PEFT's ``lora.Linear`` (``_peft_layer``); adapters in ``adapter_dtype``, or in the activation
    dtype when None."""

    def build(inp: LoRAInputs) -> Layer:
        return Layer(*_peft_layer(inp, adapter_dtype or inp.x.dtype))

    return build


def _peft_missing(case: Case) -> str | None:
    return None if importlib.util.find_spec("peft") else "peft is not installed (pip install peft)"


def _peft_fp32_unavailable(case: Case) -> str | None:
    if case.dtype == "fp32":
        return "same as peft when the activations are float32"
    return _peft_missing(case)


def _initial_magnitude(inp: LoRAInputs, dtype: torch.dtype) -> torch.Tensor:
    """PEFT's DoRA initialisation on these adapters: ``m = ‖W + s·B A‖`` (so m/n = 1), a leaf."""
    wide = torch.promote_types(inp.weight.dtype, torch.float32)
    delta = inp.lora_B.detach().to(wide) @ inp.lora_A.detach().to(wide)
    norm = torch.linalg.vector_norm(inp.weight.to(wide) + inp.scaling * delta, dim=1)
    return nn.Parameter(norm.to(dtype))


def _peft_dora(inp: LoRAInputs) -> Layer:
    """PEFT's DoRA ``lora.Linear`` sharing ``W``, adapters (and m) in the activation dtype."""
    layer, lora_A, lora_B = _peft_layer(inp, inp.x.dtype, use_dora=True)
    magnitude = layer.lora_magnitude_vector["default"].weight = _initial_magnitude(inp, inp.x.dtype)
    return Layer(layer, lora_A, lora_B, magnitude=magnitude)


def _fastlora_dora(inp: LoRAInputs) -> Layer:
    from ..dora import WeightNormCache, dora_linear

    magnitude, cache = _initial_magnitude(inp, inp.lora_A.dtype), WeightNormCache()

    def forward(x):
        return dora_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, magnitude, inp.scaling, cache=cache)

    return Layer(forward, inp.lora_A, inp.lora_B, magnitude=magnitude)


def _fastlora_builder(backend: str) -> Callable[[LoRAInputs], Layer]:
    def build(inp: LoRAInputs) -> Layer:
        def forward(x):
            return lora_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, backend=backend)

        return Layer(forward, inp.lora_A, inp.lora_B)

    return build


def _auto(inp: LoRAInputs) -> Layer:
    grad_enabled = []  # the grad mode of the last call, so that the note explains that call's problem

    def forward(x):
        grad_enabled[:] = [torch.is_grad_enabled()]
        return lora_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)

    def describe() -> str:
        choice = explain_backend(inp.x, inp.weight, inp.lora_A, inp.lora_B, requires_grad=all(grad_enabled))
        return f"auto → {choice['backend']}: {choice['reason']}"

    return Layer(forward, inp.lora_A, inp.lora_B, describe)


def not_timed_reason(backend: str, device: str) -> str | None:
    """Why the bench does not time fastlora's ``backend`` on ``device`` here, or None when it does."""
    status = available_backends()[backend]
    if not status.available:
        return status.detail
    if backend != "torch" and device == "cpu":
        reason = f"the {backend} backend runs on CUDA tensors"
        if backend == "triton":  # the interpreter: a correctness tool, orders of magnitude too slow to time
            reason += " (on CPU tensors only under TRITON_INTERPRET=1, the tests' interpreter, far too slow to time)"
        return reason
    return None


def _fused_unavailable(backend: str) -> Callable[[Case], str | None]:
    def unavailable(case: Case) -> str | None:
        return not_timed_reason(backend, case.device)

    return unavailable


QLORA_RECIPE = {"quant_type": "nf4", "blocksize": 64, "compress_statistics": True}


def _linear4bit(inp: LoRAInputs):
    """A bitsandbytes ``Linear4bit`` of the inputs' W (the QLoRA recipe), computing in x's dtype."""
    from .. import qlora

    N, K = inp.weight.shape
    linear = nn.Linear(K, N, bias=inp.bias is not None, device="meta")
    linear.weight = nn.Parameter(inp.weight, requires_grad=False)
    if inp.bias is not None:
        linear.bias = nn.Parameter(inp.bias, requires_grad=False)
    return qlora.quantize_linear(linear, **QLORA_RECIPE, compute_dtype=inp.x.dtype)


def dequantized_4bit(inp: LoRAInputs) -> LoRAInputs:
    """``inp`` with W replaced by its 4-bit quantization, dequantized: what the 4-bit providers hold."""
    from .. import qlora

    layer = _linear4bit(inp)
    weight = qlora.Weight4bit(layer.weight, inp.x.dtype).dequantized(inp.x.dtype)
    return dataclasses.replace(inp, weight=weight)


def _peft_qlora_builder(fused: bool) -> Callable[[LoRAInputs], Layer]:
    def build(inp: LoRAInputs) -> Layer:
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as PeftLoRALinear4bit

        from ..peft_integration import patch_peft

        r = inp.lora_A.shape[0]
        config = LoraConfig(r=r, lora_alpha=inp.scaling * r)
        layer = PeftLoRALinear4bit(_linear4bit(inp), "default", config=config, r=r, lora_alpha=inp.scaling * r)
        lora_A = layer.lora_A["default"].weight = nn.Parameter(inp.lora_A.detach().float())
        lora_B = layer.lora_B["default"].weight = nn.Parameter(inp.lora_B.detach().float())
        if fused:
            wrapper = nn.Module()
            wrapper.layer = layer
            if patch_peft(wrapper) != 1:
                raise Unavailable("patch_peft left the 4-bit layer on PEFT's forward (see its warning)")
        return Layer(layer, lora_A, lora_B)

    return build


def _qlora_unavailable(fused: bool) -> Callable[[Case], str | None]:
    def unavailable(case: Case) -> str | None:
        if case.device != "cuda":
            return "QLoRA providers run on CUDA only (bitsandbytes' and fastlora's 4-bit kernels)"
        if case.dtype == "fp32":
            return "QLoRA computes in fp16/bf16"
        for package, extra in (("bitsandbytes", "qlora"), ("peft", "peft")):
            if not importlib.util.find_spec(package):
                return f"{package} is not installed (pip install {package}, or in the fastlora checkout: pip install -e '.[{extra}]')"
        return _fused_unavailable("triton")(case) if fused else None

    return unavailable


def _compiled(inp: LoRAInputs) -> Layer:
    compiled = torch.compile(reference.lora_linear, fullgraph=True, dynamic=False)

    def forward(x):
        return compiled(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)

    try:
        with torch.no_grad():
            forward(inp.x)
    except Exception as err:  # no C++ compiler, unsupported platform, ...
        raise Unavailable(f"torch.compile failed: {describe(err)}") from err
    return Layer(forward, inp.lora_A, inp.lora_B)


def _reset_dynamo() -> None:
    """Drop graphs compiled for earlier cases: their guards would slow every call and count
    towards dynamo's recompile limit, past which it silently runs eager."""
    torch._dynamo.reset()


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("base", _base, lora=False),
        Provider("naive", _naive),
        Provider("peft-fp32", _peft_builder(torch.float32), _peft_fp32_unavailable),
        Provider("peft", _peft_builder(None), _peft_missing),
        Provider("addmm", _addmm),
        Provider("compiled", _compiled, start_case=_reset_dynamo),
        Provider("fastlora-torch", _fastlora_builder("torch")),
        Provider("fastlora-triton", _fastlora_builder("triton"), _fused_unavailable("triton")),
        Provider("fastlora-cuda", _fastlora_builder("cuda"), _fused_unavailable("cuda")),
        Provider("fastlora-auto", _auto),
        Provider("peft-qlora", _peft_qlora_builder(False), _qlora_unavailable(False), reference_inputs=dequantized_4bit),
        Provider("fastlora-qlora", _peft_qlora_builder(True), _qlora_unavailable(True), reference_inputs=dequantized_4bit),
        Provider("peft-dora", _peft_dora, _peft_missing),
        Provider("fastlora-dora", _fastlora_dora),
    )
}
