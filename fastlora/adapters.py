"""Save and load the adapters of a ``replace_linear_with_lora`` model in PEFT's on-disk format.

A directory holds ``adapter_config.json`` (a PEFT ``LoraConfig``) and ``adapter_model.safetensors``
with, for the ``FusedLoRALinear`` at module path ``<name>``::

    base_model.model.<name>.lora_A.weight   [r, in]
    base_model.model.<name>.lora_B.weight   [out, r]
    base_model.model.<name>.lora_magnitude_vector   [out]   (DoRA layers, ``use_dora=True``)

so ``PeftModel.from_pretrained(model_before_conversion, path)`` loads what ``save_adapter`` writes,
and ``load_adapter`` loads what PEFT's ``save_pretrained`` writes for a LoRA or DoRA adapter (no
``lora_bias``, no ``modules_to_save``) on ``nn.Linear`` layers.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re

import torch
from torch import nn

from .layers import FusedLoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's key prefix: PeftModel.base_model (LoraModel) .model (the wrapped model).
KEY_PREFIX = "base_model.model."


def _lora_layers(model: nn.Module) -> dict[str, FusedLoRALinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
    if not layers:
        raise ValueError("the model has no FusedLoRALinear layers; convert it with replace_linear_with_lora first")
    return layers


def _keys(name: str) -> tuple[str, str]:
    return f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"


def _magnitude_key(name: str) -> str:
    """PEFT's key of a DoRA layer's magnitude (the adapter name and ``.weight`` are dropped)."""
    return f"{KEY_PREFIX}{name}.lora_magnitude_vector"


def _use_dora(layers: dict) -> bool:
    """The layers' one ``use_dora`` value (PEFT's config holds one flag)."""
    flags = {layer.use_dora for layer in layers.values()}
    if len(flags) > 1:
        raise ValueError("save_adapter/load_adapter need one use_dora value for all layers (PEFT's config has one flag)")
    return flags.pop()


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` look-up: the first key that, as a regex, matches
    the end of the module path ``name`` at a '.' boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapters of every ``FusedLoRALinear`` of ``model`` to the directory ``path`` (created
    if needed) in PEFT's format. ``target_modules`` lists the layers' full module paths; the most
    common ``(r, alpha)`` is the config's, the other layers go to ``rank_pattern`` / ``alpha_pattern``.
    All layers must share ``use_rslora``, as PEFT's config holds one flag."""
    from safetensors.torch import save_file  # the "peft" extra: fastlora itself does not need it

    layers = _lora_layers(model)
    if len({layer.use_rslora for layer in layers.values()}) > 1:
        raise ValueError("save_adapter needs one use_rslora value for all layers (PEFT's config has one flag)")
    r, alpha = collections.Counter((layer.r, layer.alpha) for layer in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": next(iter(layers.values())).use_rslora,
        "target_modules": sorted(layers),
        "rank_pattern": {re.escape(name): layer.r for name, layer in layers.items() if layer.r != r},
        "alpha_pattern": {re.escape(name): layer.alpha for name, layer in layers.items() if layer.alpha != alpha},
        "lora_dropout": collections.Counter(layer.lora_dropout for layer in layers.values()).most_common(1)[0][0],
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "use_dora": _use_dora(layers),
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    tensors = {}
    for name, layer in layers.items():
        key_A, key_B = _keys(name)
        tensors[key_A] = layer.lora_A.detach().cpu().contiguous()
        tensors[key_B] = layer.lora_B.detach().cpu().contiguous()
        if layer.use_dora:
            tensors[_magnitude_key(name)] = layer.magnitude.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a PEFT LoRA adapter directory into the ``FusedLoRALinear`` layers of ``model``, in place.

    The values are copied into the existing ``lora_A`` / ``lora_B`` storage (cast to their dtype),
    so optimizers, compiled models and captured CUDA graphs stay valid across adapter
    swaps. Everything is checked before anything is copied; a ValueError names the first problem:
    keys missing from or unexpected in the file, a rank or shape that differs from the layer's, or a
    ``scaling`` (``lora_alpha / r``, ``/ √r`` with ``use_rslora``) that differs from the layer's —
    which is a Python float baked into compiled code, so build the model with the file's values.
    """
    from safetensors.torch import load_file  # the "peft" extra: fastlora itself does not need it

    layers = _lora_layers(model)
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} holds a {config.get('peft_type')!r} adapter, not a LoRA one")
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    expected = {key for name in layers for key in _keys(name)}
    expected |= {_magnitude_key(name) for name, layer in layers.items() if layer.use_dora}
    if expected - tensors.keys():
        raise ValueError(f"keys missing from {path}: {_listing(expected - tensors.keys())}")
    if tensors.keys() - expected:
        raise ValueError(
            f"unexpected keys in {path} (lora_bias and modules_to_save are not supported, DoRA needs use_dora=True layers, and every "
            f"adapted layer must be a FusedLoRALinear): {_listing(tensors.keys() - expected)}"
        )
    if bool(config.get("use_dora")) != _use_dora(layers):
        raise ValueError(
            f"{path} has use_dora={bool(config.get('use_dora'))}, the model's layers have use_dora={_use_dora(layers)}"
        )
    copies = []
    for name, layer in layers.items():
        key_A, key_B = _keys(name)
        A, B = tensors[key_A], tensors[key_B]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != layer.r or B.shape[1] != layer.r:
            raise ValueError(
                f"rank mismatch at {name}: the file has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                f"the layer has r={layer.r}"
            )
        if A.shape != layer.lora_A.shape or B.shape != layer.lora_B.shape:
            raise ValueError(
                f"shape mismatch at {name}: the file has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                f"the layer has {tuple(layer.lora_A.shape)} and {tuple(layer.lora_B.shape)}"
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        scaling = alpha / (math.sqrt(layer.r) if config.get("use_rslora") else layer.r)
        if not math.isclose(scaling, layer.scaling, rel_tol=1e-6):
            raise ValueError(
                f"scaling mismatch at {name}: the file's lora_alpha={alpha}, r={layer.r}, "
                f"use_rslora={bool(config.get('use_rslora'))} give {scaling:g}, the layer's is {layer.scaling:g}"
            )
        copies += [(layer.lora_A, A), (layer.lora_B, B)]
        if layer.use_dora:
            magnitude = tensors[_magnitude_key(name)]
            if magnitude.shape != layer.magnitude.shape:
                raise ValueError(
                    f"shape mismatch at {name}: the file has lora_magnitude_vector {tuple(magnitude.shape)}, "
                    f"the layer has {tuple(layer.magnitude.shape)}"
                )
            copies.append((layer.magnitude, magnitude))
    with torch.no_grad():
        for param, value in copies:
            param.copy_(value)
