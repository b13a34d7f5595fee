"""Argument validation shared by every public entry point.

Each check raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape, device or
value) with a message naming the argument, what was expected and what was given. The tensor
checks read only shapes, dtypes and devices, so they cost no device sync and trace under
``torch.compile``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Iterable

import torch
from torch import nn

from .ops.registry import BACKEND_NAMES, FUSED_BACKENDS, BackendUnavailableError, backend_state

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}")
    return value


def check_dtype(name: str, dtype: object) -> torch.dtype | None:
    """``dtype`` (or None, "the default"): a floating-point ``torch.dtype`` that parameters can have."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        what = dtype if isinstance(dtype, torch.dtype) else f"{type(dtype).__name__} {dtype!r}"
        raise TypeError(f"{name} must be a floating-point torch.dtype (float16, bfloat16, float32 or float64), got {what}")
    return dtype


def _require_dim(name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")


def check_scaling(scaling: object, name: str = "scaling") -> float:
    """``scaling`` (or the ``alpha`` it is made from, named by ``name``) as a finite Python float.

    ``lora_linear`` (and so ``patch_peft``) takes any finite scaling, zero and negative included: it
    computes the formula it is given, and PEFT accepts any float ``lora_alpha``. The layers, which
    create their adapters, are stricter (``check_alpha``).
    """
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{name} must be a real number (a Python float), got {type(scaling).__name__}")
    value = float(scaling)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_alpha(alpha: object) -> float:
    """A new layer's ``alpha`` as a float > 0. Zero makes ``scaling`` zero: the adapter adds nothing
    and gets no gradient, so training silently does nothing. A negative alpha only flips the sign
    of ``B``, which starts at zero and is learnt, so it buys nothing and is far likelier a slip."""
    value = check_scaling(alpha, "alpha")
    if value <= 0:
        raise ValueError(
            f"alpha must be > 0 (scaling = alpha / r multiplies the adapter; 0 switches it off and stops its "
            f"gradients, a negative alpha only flips lora_B's sign), got {value:g}"
        )
    return value


def check_backend(backend: object) -> str:
    """``backend`` is one of ``BACKEND_NAMES``; a near miss gets a "did you mean"."""
    if isinstance(backend, str) and backend in BACKEND_NAMES:
        return backend
    close = difflib.get_close_matches(backend.lower(), BACKEND_NAMES, n=1) if isinstance(backend, str) and backend else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}{hint}")


def check_backend_can_load(backend: str) -> None:
    """For a layer built with a named fused backend: raise now what can be known without an input.

    Checked here: the backend is installed and loads (triton importable and recent enough, the
    extension built), and some device it runs on exists (a CUDA GPU is visible, or the triton
    interpreter is on for CPU tensors). Not checked: the device, dtype and rank of each call,
    since a module is moved and cast after it is built; those are checked at each call.
    ``torch.cuda.is_available()`` counts devices without creating a CUDA context."""
    if backend not in FUSED_BACKENDS:
        return
    state = backend_state(backend)
    if isinstance(state, str):
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {state}; use backend='torch' or 'auto'")
    runs_on = state.runs_on or ()
    if runs_on and "cpu" not in runs_on and "cuda" in runs_on and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"backend={backend!r} runs on CUDA tensors and no CUDA device is visible "
            f"(torch.cuda.is_available() is False); use backend='torch' or 'auto'"
        )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_rank(r: object) -> int:
    return _positive_int("r (the LoRA rank)", r)


def check_layer_args(in_features: object, out_features: object, r: object, alpha: object, backend: object) -> tuple[int, float]:
    """Validate ``FusedLoRALinear``'s configuration; returns ``(r, alpha)`` as int and float.

    A named fused backend must be installed and have a device to run on (``check_backend_can_load``);
    whether it supports the tensors' device, dtype and rank is settled per call, since a module can
    be moved and cast after it is built.
    """
    _positive_int("in_features", in_features)
    _positive_int("out_features", out_features)
    r, alpha = check_rank(r), check_alpha(alpha)
    check_backend_can_load(check_backend(backend))
    return r, alpha


def check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling) -> float:
    """Validate the arguments of ``lora_linear``; returns ``scaling`` as a float.

    Shapes: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` or None, ``lora_A [r, in]``,
    ``lora_B [out, r]``. All on one device. ``x``, ``weight`` and ``bias`` share one dtype; the
    adapters share theirs, which is ``x``'s or float32 (PEFT's default fp32 adapters).
    """
    if _valid_lora_inputs(x, weight, bias, lora_A, lora_B, scaling):
        return scaling
    return _check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling)


def _valid_lora_inputs(x, weight, bias, lora_A, lora_B, scaling) -> bool:
    """Whether every check of ``_check_lora_inputs`` passes, with ``scaling`` a float already: the
    path of every valid call, reading each attribute once (1.6 µs against the checks' 3.9 µs, each
    of which builds its own shapes, devices and messages' arguments). False sends the call to
    ``_check_lora_inputs``, which raises the error naming the problem (or converts ``scaling``)."""
    Tensor = torch.Tensor
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor) and type(scaling) is float and math.isfinite(scaling)):  # fmt: skip
        return False
    dtype, adapter_dtype = x.dtype, lora_A.dtype
    if not (dtype in FLOAT_DTYPES and weight.dtype == dtype and lora_B.dtype == adapter_dtype
            and (adapter_dtype == dtype or adapter_dtype == torch.float32)):  # fmt: skip
        return False
    x_shape, w_shape, a_shape = x.shape, weight.shape, lora_A.shape
    if not (len(x_shape) >= 1 and len(w_shape) == 2 and len(a_shape) == 2):
        return False
    out_features, in_features = w_shape
    r = a_shape[0]
    if not (out_features >= 1 and in_features >= 1 and r >= 1 and x_shape[-1] == in_features
            and a_shape[1] == in_features and lora_B.shape == (out_features, r)):  # fmt: skip
        return False
    device = x.device
    if not (weight.device == device and lora_A.device == device and lora_B.device == device):
        return False
    return bias is None or (
        isinstance(bias, Tensor) and bias.dtype == dtype and bias.shape == (out_features,) and bias.device == device
    )


def _check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling) -> float:
    """``check_lora_inputs``, one check at a time: the first that fails raises its message."""
    for name, value in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features], got a 0-D tensor")
    _require_dim("weight", weight, 2, "[out_features, in_features]")
    _require_dim("lora_A", lora_A, 2, "[r, in_features]")
    _require_dim("lora_B", lora_B, 2, "[out_features, r]")
    out_features, in_features = weight.shape
    if out_features == 0 or in_features == 0:
        raise ValueError(f"weight must have shape [out_features, in_features] with both >= 1, got {tuple(weight.shape)}")
    r = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must equal weight.shape[1] = in_features = {in_features}, got x of shape {tuple(x.shape)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape [r, in_features={in_features}], got {tuple(lora_A.shape)}")
    if r < 1:
        raise ValueError(f"lora_A must have at least one row (r >= 1), got shape {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B must have shape [out_features={out_features}, r={r}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [out_features={out_features}], got {tuple(bias.shape)}")

    for name, value in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if value is not None and value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}; move all tensors to one device")

    if weight.dtype != x.dtype:
        raise TypeError(f"weight's dtype must equal x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias's dtype must equal x's dtype {x.dtype}, got {bias.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B's dtype must equal lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"adapters (lora_A, lora_B) must be float32 or x's dtype {x.dtype}, got {lora_A.dtype}")
    return check_scaling(scaling)


def check_dropout(p: object) -> float:
    """LoRA dropout probability as a float in [0, 1], as ``nn.Dropout`` accepts."""
    if type(p) is float and 0.0 <= p <= 1.0:  # every valid call passes a float: skip the ABC check (0.4 µs)
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {p!r}")
    return float(p)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list: a module matches a target when its qualified name equals it or ends
    with '.' + it."""
    return name == target or name.endswith("." + target)


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The output layer that PEFT's "all-linear" leaves out: ``get_output_embeddings()`` of a
    transformers model (e.g. ``lm_head``); None for a model without that method."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    return output if isinstance(output, nn.Module) else None


def _regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"target_modules={pattern!r} is not a valid regular expression ({err}); a string is a regex "
            f"matched against whole module names, as in PEFT (pass a list to match names by suffix)"
        ) from None


def check_target_modules(model: nn.Module, target_modules: object) -> list[tuple[str, nn.Linear]]:
    """The ``(name, nn.Linear)`` submodules of ``model`` that ``target_modules`` selects, as PEFT
    reads ``LoraConfig.target_modules``:

    - None: every ``nn.Linear``;
    - ``"all-linear"`` (any case): every ``nn.Linear`` except the output layer
      (``model.get_output_embeddings()``, e.g. a language model's ``lm_head``); a model without that
      method (an ``nn.Sequential``) has every ``nn.Linear`` selected, as PEFT does;
    - any other string: a regular expression that must match a whole qualified module name
      (``re.fullmatch``), e.g. ``".*(q_proj|v_proj)"``;
    - a list (any iterable) of names: modules whose qualified name equals a name or ends with
      '.' + name. Every name must select at least one ``nn.Linear``: a misspelt target would
      otherwise leave layers without adapters and training would go on, silently weaker. The error
      names each such target with the modules it does match (e.g. ones already converted) or,
      failing that, the closest names.
    """
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and name]
    if target_modules is None or (isinstance(target_modules, str) and target_modules.lower() == "all-linear"):
        if not linears:
            raise ValueError(f"model ({type(model).__name__}) has no nn.Linear submodule to replace")
        output = _output_layer(model) if target_modules is not None else None
        return [(name, m) for name, m in linears if m is not output]
    if isinstance(target_modules, str):
        regex = _regex(target_modules)
        chosen = [(name, m) for name, m in linears if regex.fullmatch(name)]
        if chosen:
            return chosen
        others = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if name and regex.fullmatch(name)]
        if others:
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            problem = f"matches only modules that are not nn.Linear: {', '.join(others[:3])}{more}"
        elif any(_matches(name, target_modules) for name, _ in linears):
            problem = f"matches no whole module name (did you mean target_modules=[{target_modules!r}], which matches names ending in it?)"
        else:
            close = difflib.get_close_matches(target_modules, sorted({n.rpartition(".")[2] for n, _ in linears}), n=3)
            problem = "matches no module name" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
        raise ValueError(
            f"target_modules={target_modules!r} {problem}; a string is a regular expression matched against "
            f"whole module names (re.fullmatch), as in PEFT"
        )
    if not isinstance(target_modules, Iterable):
        raise TypeError(f"target_modules must be None, a module name or a list of names, got {target_modules!r}")
    targets = list(target_modules)
    if not all(isinstance(t, str) for t in targets):
        raise TypeError(f"target_modules must be None, a module name or a list of names, got {target_modules!r}")
    if not targets:
        raise ValueError("target_modules must name at least one module, got an empty list (None selects every nn.Linear)")

    problems = []
    for target in targets:
        if any(_matches(name, target) for name, _ in linears):
            continue
        others = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if name and _matches(name, target)]
        if others:
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            problems.append(f"{target!r} matches only modules that are not nn.Linear: {', '.join(others[:3])}{more}")
            continue
        leaf_names = {name.rpartition(".")[2] for name, _ in linears}
        close = difflib.get_close_matches(target, sorted(leaf_names), n=3)
        problems.append(f"{target!r} matches no module" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    if problems:
        raise ValueError(
            f"target_modules={targets} must each match an nn.Linear (a module whose qualified name equals the "
            f"target or ends with '.' + target): {'; '.join(problems)}"
        )
    return [(name, m) for name, m in linears if any(_matches(name, t) for t in targets)]
