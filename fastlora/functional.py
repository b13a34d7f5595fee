"""``lora_linear``: the functional form of the fused LoRA layer."""

from __future__ import annotations

import torch

from ._checks import check_backend, check_dropout, check_lora_inputs
from .ops.registry import backend_ops


def resolve_backend(*args):
    """``fastlora.ops.auto.resolve_backend``, imported on the first call (this stub then replaces
    itself with it, so later calls pay nothing): ``import fastlora`` loads the backend table only,
    not ``auto``'s measuring machinery (issue 21: the registry is importable without the resolver)."""
    global resolve_backend
    from .ops.auto import resolve_backend as resolve

    resolve_backend = resolve
    return resolve(*args)

# Seeds are drawn below 2³¹ so that every backend's RNG takes them as they are.
_SEED_BOUND = 2**31 - 1


def draw_seed(dropout: float) -> torch.Tensor | None:
    """The dropout seed of one call (a 0-d int64 CPU tensor from torch's default generator), None
    without dropout. Refused under CUDA-graph capture: the seed is drawn on the host, so the
    captured graph would hold one seed and every replay would apply the same mask."""
    if not dropout:
        return None
    if not torch.compiler.is_compiling() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"LoRA dropout (p={dropout:g}) under CUDA-graph capture: fastlora draws the dropout seed on the host "
            "per call, so every replay of the captured graph would apply the same dropout mask. Capture with "
            "dropout off (lora_dropout=0, or the model in eval mode), or run the training step eagerly "
            "(e.g. torch.compile without mode='reduce-overhead')"
        )
    return torch.randint(_SEED_BOUND, (), dtype=torch.int64)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``, differentiable.

    Shapes: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` or None, ``lora_A [r, in]``,
    ``lora_B [out, r]`` (PEFT's layout); returns ``[..., out]`` in ``x``'s dtype. The adapters may
    be float32 while ``x`` and ``weight`` are fp16/bf16 (PEFT's default). ``dropout`` is the
    probability of LoRA dropout on the low-rank branch's input, as PEFT's ``lora_dropout``: the
    mask comes from a counter-based RNG seeded from torch's default generator (reproducible under
    ``torch.manual_seed``) and is regenerated, not stored, for the backward; pass 0 in eval mode.
    ``backend`` is one of ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` (see ``fastlora.ops.registry``;
    ``"auto"``, the default, is explained in ``fastlora.ops.auto`` and by ``fastlora.explain_backend``).
    Under ``torch.autocast`` the inputs are cast as autocast casts ``F.linear``'s.
    """
    # float64 is left alone, as autocast leaves it. _is_any_autocast_enabled (one C call, no device
    # object) first: it is False on nearly every call, and dynamo folds it as it folds the rest.
    if (
        torch._C._is_any_autocast_enabled() and isinstance(x, torch.Tensor) and x.dtype != torch.float64
        and torch.is_autocast_enabled(x.device.type)
    ):  # fmt: skip
        device_type = x.device.type
        # Autocast does not reach inside custom ops: cast here as it casts F.linear's arguments (fp32
        # adapters stay fp32, PEFT's default), then run with it off so the ops see consistent dtypes.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if lora_A.dtype != torch.float32:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout=dropout, backend=backend)
    scaling = check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling)
    dropout = check_dropout(dropout)
    ops = backend_ops(resolve_backend(check_backend(backend), x, weight, bias, lora_A, lora_B, dropout))
    seed = draw_seed(dropout) if dropout else None
    if x.dim() == 2:  # skips two views and their autograd nodes: a few µs of a small layer's call
        return ops(x, weight, bias, lora_A, lora_B, scaling, dropout, seed)
    y = ops(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, dropout, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])
