"""Run HuggingFace PEFT's LoRA ``Linear`` layers on fastlora's fused forward and backward.

``patch_peft(model)`` replaces, in place, the ``forward`` of each PEFT ``lora.Linear`` layer (and of
each 4-bit ``lora.bnb.Linear4bit``, QLoRA) by one that calls the fused layer on its own Parameters::

    y = x Wᵀ + b + scaling·(dropout(x) Aᵀ) Bᵀ
    W = base_layer.weight [out, in] (transposed from [in, out] for GPT-2's Conv1D, fan_in_fan_out;
        a bitsandbytes 4-bit Params4bit stays packed, dequantized inside the kernels, fastlora.qlora)
    b = base_layer.bias [out], A = lora_A[adapter].weight [r, in], B = lora_B[adapter].weight [out, r]
    scaling = layer.scaling[adapter] (alpha / r, or alpha / √r with use_rslora)
    dropout: lora_dropout[adapter].p while that module is training, else none

No Parameter is copied or replaced, so the optimizer, ``save_pretrained``, ``merge_and_unload``,
``set_adapter`` and ``disable_adapter`` keep working. Every call re-checks the layer's state and runs
PEFT's own forward whenever the fused one would not compute exactly what PEFT computes: adapters
disabled or merged, several (or no) active adapters, a variant adapter other than DoRA, a ``lora_B``
bias, extra forward arguments (``adapter_names`` mixed batches), hooks on the sub-modules
(accelerate's offloading), dtypes ``lora_linear`` does not take, and an input not in a 4-bit
layer's compute dtype. LoRA dropout is fused too: its mask has PEFT's distribution
but comes from fastlora's RNG, so a training run with ``lora_dropout`` > 0 is not bitwise PEFT's.

A DoRA adapter (``use_dora=True``) on a ``lora.Linear`` runs on ``fastlora.dora.dora_linear`` with
PEFT's ``lora_magnitude_vector[adapter].weight`` as its magnitude; DoRA on a 4-bit base (QDoRA) is
left on PEFT's forward and named in the warning.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from . import qlora
from ._checks import check_backend
from ._quiet import quiet_foreign_logs
from .qlora import DenseWeight, base_weight, compute_dtype_of, is_4bit, unsupported_reason


@functools.cache
def _peft_classes():
    """PEFT's ``LoraLayer`` and ``Linear`` and transformers' ``Conv1D``, imported on first use so that
    fastlora itself does not depend on PEFT."""
    quiet_foreign_logs()  # bitsandbytes' Hub-kernel message when PEFT imports it on a CPU (fastlora/_quiet.py)
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
        from transformers.pytorch_utils import Conv1D
    except ImportError as err:
        raise ImportError(f"patch_peft needs the peft and transformers packages ({err}); `pip install peft`") from err
    return LoraLayer, Linear, Conv1D


def _active_adapter(layer) -> tuple[str | None, str | None]:
    """``(adapter, None)`` when a PEFT ``lora.Linear``'s active adapter has a fused form, else
    ``(None, why)``."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active adapters on this layer, fastlora fuses exactly one"
    (adapter,) = active
    if adapter in layer.lora_variant and not _is_dora(layer, adapter):
        return None, f"adapter {adapter!r} is a {type(layer.lora_variant[adapter]).__name__} (DoRA or another variant)"
    if layer.lora_B[adapter].bias is not None:
        return None, f"adapter {adapter!r} has lora_bias=True"
    return adapter, None


def _is_dora(layer, adapter: str) -> bool:
    """Whether ``adapter`` is PEFT's DoRA on a ``lora.Linear`` (fused by ``fastlora.dora``)."""
    variant = type(layer.lora_variant.get(adapter))
    return (
        variant.__name__ == "DoraLinearVariant" and variant.__module__ == "peft.tuners.lora.variants"
        and type(layer) is _peft_classes()[1] and adapter in layer.lora_magnitude_vector
    )  # fmt: skip


def _dora_forward(layer, adapter: str, base, x: torch.Tensor, dropout: float, backend: str) -> torch.Tensor:
    """PEFT's DoRA forward on ``fastlora.dora.dora_linear``, with a ``‖W‖²`` cache kept on the layer."""
    from .dora import WeightNormCache, dora_linear

    cache = layer.__dict__.setdefault("_fastlora_dora_norm", WeightNormCache())
    return dora_linear(
        x, base.weight, layer.base_layer.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
        layer.lora_magnitude_vector[adapter].weight, layer.scaling[adapter], dropout=dropout, backend=backend, cache=cache,
    )  # fmt: skip


def _is_peft_4bit(layer) -> bool:
    """PEFT's ``lora.bnb.Linear4bit`` (checked by name: importing it imports bitsandbytes)."""
    return type(layer).__name__ == "Linear4bit" and type(layer).__module__ == "peft.tuners.lora.bnb"


def _unsupported_reason(layer, backend: str) -> str | None:
    """Why a PEFT LoRA layer cannot be patched to run on ``backend``, or None."""
    _, linear_cls, conv1d_cls = _peft_classes()
    if _is_peft_4bit(layer):
        if backend == "cuda":
            return "4-bit layer: the cuda backend has no 4-bit kernels (use backend='auto' or 'triton')"
        weight = layer.get_base_layer().weight
        if not is_4bit(weight):
            return f"4-bit layer whose weight is a {type(weight).__name__}, not a bitsandbytes Params4bit"
        reason = unsupported_reason(weight)
        if any(a in layer.lora_variant for a in layer.active_adapters):
            return "DoRA or another variant on a 4-bit base (QDoRA): not fused by fastlora"
        return f"4-bit weight not read by fastlora: {reason}" if reason else _active_adapter(layer)[1]
    if type(layer) is not linear_cls:
        return f"{type(layer).__name__} layers have no fused path (only lora.Linear and lora.bnb.Linear4bit)"
    if type(layer.base_layer) not in (nn.Linear, conv1d_cls):
        if is_4bit(getattr(layer.base_layer, "weight", None)) and any(a in layer.lora_variant for a in layer.active_adapters):
            return "DoRA or another variant on a 4-bit base (QDoRA): not fused by fastlora"
        return f"base layer is a {type(layer.base_layer).__name__}, not an unquantized nn.Linear or Conv1D"
    return _active_adapter(layer)[1]


def _base_weight(layer):
    """The base layer's weight as fastlora's strategy object (``fastlora.qlora``), or None when a
    4-bit weight's state changed since patching (bitsandbytes repacked it for its CPU kernel)."""
    base = layer.base_layer
    if _is_peft_4bit(layer):
        state = getattr(base.weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return None
        return base_weight(base.weight, compute_dtype_of(base))
    return DenseWeight(base.weight.t() if layer.fan_in_fan_out else base.weight)  # Conv1D stores [in, out]


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's ``forward`` (hooks, accelerate's patched
    ``forward`` for offloading), which the fused path would skip."""
    hooks = module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks
    return any(hooks) or "forward" in module.__dict__


def _fusable_adapter(layer, base, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The adapter whose forward the fused layer over ``base`` (a ``_base_weight``) computes
    exactly as PEFT would, or None (use PEFT's)."""
    if base is None or args or kwargs or layer.disable_adapters or layer.merged:
        return None
    adapter, _ = _active_adapter(layer)
    if adapter is None:
        return None
    lora_A, lora_B, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return None
    if any(_has_hooks(m) for m in (layer.base_layer, lora_A, lora_B, dropout)):
        return None
    if adapter in layer.lora_variant and _has_hooks(layer.lora_magnitude_vector[adapter]):
        return None
    if not base.accepts(x) or lora_A.weight.dtype not in (x.dtype, torch.float32):
        return None
    return adapter


def _dense_forward(layer, backend: str, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``_fused_forward`` of a ``lora.Linear`` (not 4-bit), or None where PEFT's forward must run: the
    checks of ``_fusable_adapter`` and ``_has_hooks``, inlined and reading submodules and Parameters
    from ``_modules`` / ``_parameters``. Each ``nn.Module.__getattr__`` is a Python call, and the
    helpers made about 50 of them a call: 10 µs, which put the patched forward above PEFT's own."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    modules = layer._modules
    adapters_A = modules["lora_A"]._modules
    active = [name for name in layer.active_adapters if name in adapters_A]
    if len(active) != 1 or active[0] in layer.lora_variant:
        return None
    adapter = active[0]
    base, lora_A = modules["base_layer"], adapters_A[adapter]
    lora_B, dropout = modules["lora_B"]._modules[adapter], modules["lora_dropout"]._modules[adapter]
    if lora_B._parameters.get("bias") is not None or type(dropout) not in (nn.Identity, nn.Dropout):
        return None
    for m in (base, lora_A, lora_B, dropout):  # _has_hooks
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return None
        if "forward" in m.__dict__:
            return None
    params = base._parameters
    weight = params["weight"] if "weight" in params else base.weight
    weight = weight.t() if layer.fan_in_fan_out else weight  # Conv1D stores [in, out]
    A = lora_A._parameters["weight"]
    if x.dtype != weight.dtype or A.dtype not in (x.dtype, torch.float32):
        return None
    bias = params["bias"] if "bias" in params else base.bias
    p = dropout.p if type(dropout) is nn.Dropout and dropout.training else 0.0
    # qlora's name, as DenseWeight.lora_linear calls it (the tests spy on it there).
    B = lora_B._parameters["weight"]
    return qlora.lora_linear(x, weight, bias, A, B, layer.scaling[adapter], dropout=p, backend=backend)


def _fused_forward(layer, backend: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The patched ``layer.forward``: the fused layer when exact, PEFT's class ``forward`` otherwise."""
    if not layer.lora_variant and not _is_peft_4bit(layer):  # DoRA layers take the general path below
        y = _dense_forward(layer, backend, x, args, kwargs)
        return type(layer).forward(layer, x, *args, **kwargs) if y is None else y
    base = _base_weight(layer)
    adapter = _fusable_adapter(layer, base, x, args, kwargs)
    if adapter is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    dropout = layer.lora_dropout[adapter]
    if adapter in layer.lora_variant:  # DoRA (the only variant _active_adapter lets through)
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training and layer.training else 0.0
        return _dora_forward(layer, adapter, base, x, p, backend)
    return base.lora_linear(
        x,
        layer.base_layer.bias,
        layer.lora_A[adapter].weight,
        layer.lora_B[adapter].weight,
        layer.scaling[adapter],
        dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0,
        backend,
    )


def _grouped(skipped: list[tuple[str, str]], names_shown: int = 3) -> str:
    """One line per reason, most frequent first: ``<count> × <reason>: <a few names> and <n> more``."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    lines = []
    for reason, names in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        more = f" and {len(names) - names_shown} more" if len(names) > names_shown else ""
        lines.append(f"{len(names)} × {reason}: {', '.join(names[:names_shown])}{more}")
    return "\n  ".join(lines)


def _is_patched(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _fused_forward


def patch_peft(model: nn.Module, *, backend: str = "auto") -> int:
    """Run every supported PEFT ``lora.Linear`` layer of ``model`` (a ``PeftModel`` or any module that
    contains PEFT LoRA layers) on fastlora's fused forward and backward, in place. Returns the number
    of layers patched.

    Supported: ``lora.Linear`` over an unquantized ``nn.Linear`` or GPT-2 ``Conv1D``, and
    ``lora.bnb.Linear4bit`` over a bitsandbytes NF4/FP4 weight the QLoRA kernels read (see
    ``fastlora.qlora``; an unreadable quant state is named in the warning), with exactly one
    active adapter, no variant but DoRA (not on a 4-bit base), no ``lora_bias``; any rank, ``lora_alpha``, ``use_rslora``,
    fp32 adapters with an fp16/bf16 base. Other LoRA layers are left untouched and listed, with the
    reason, in one warning (one line per reason, with a count and a few names). A model with no
    PEFT LoRA layer at all raises ValueError (most often: the base model was passed where the
    ``get_peft_model`` result was meant, or a ``replace_linear_with_lora`` model, whose layers
    already are fastlora's). A patched layer still runs PEFT's forward in the states listed in the
    module doc (merged, disabled, ...), so results are PEFT's in every state, up to the
    dropout mask's RNG. The instance-level ``forward`` is a ``functools.partial`` (picklable, deep-copyable);
    patching again re-patches (e.g. with another ``backend``) and patches layers that became supported
    after ``set_adapter``. ``unpatch_peft`` undoes it.
    """
    # The name now (a typo gets "did you mean"); whether the backend runs each layer's tensors is
    # decided per call, as for lora_linear (a layer it cannot fuse is named in the warning).
    check_backend(backend)
    lora_layer_cls = _peft_classes()[0]
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, lora_layer_cls)]
    if not layers:
        raise ValueError(
            f"patch_peft found no PEFT LoRA layer in {type(model).__name__}: pass the model that "
            "peft.get_peft_model(model, LoraConfig(...)) returned (a replace_linear_with_lora model "
            "already runs fastlora's layers and needs no patching)"
        )
    patched, skipped = 0, []
    for name, module in layers:
        reason = _unsupported_reason(module, backend)
        if reason is not None:
            skipped.append((name, reason))
            continue
        module.forward = functools.partial(_fused_forward, module, backend)
        patched += 1
    if skipped:
        warnings.warn(
            f"fastlora.patch_peft left {len(skipped)} of {len(layers)} LoRA layer(s) on PEFT's forward "
            f"({patched} run fused):\n  {_grouped(skipped)}",
            stacklevel=2,
        )
    return patched


def unpatch_peft(model: nn.Module) -> int:
    """Give every layer that ``patch_peft`` patched back its PEFT ``forward``. Returns how many."""
    restored = 0
    for module in model.modules():
        if _is_patched(module):
            del module.forward
            restored += 1
    return restored
