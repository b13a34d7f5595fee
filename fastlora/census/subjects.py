"""What the census calls: each subject (a backend named through ``lora_linear``, ``"auto"``, a PEFT
``lora.Linear`` before and after ``patch_peft``) built for one problem, and the contexts that let
the fused backends run on CPU tensors with their launches stubbed.

A subject is ``(call, inputs)``: ``call()`` is one forward returning ``y``; ``inputs`` are the
tensors the backward differentiates (``x``, ``lora_A``, ``lora_B``; W and b are frozen, as in LoRA
training). Tensors are ``torch.empty`` (never initialised: nothing is computed, see ``counting``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..inspect.problems import Problem  # one problem type for inspect and the census

# The census problems: Llama-3-8B's q/o projection at decode and training M, r = 16, bf16 with bf16
# or fp32 (PEFT's default) adapters, LoRA dropout off and on.
DTYPES = {"bf16": (torch.bfloat16, torch.bfloat16), "bf16+fp32": (torch.bfloat16, torch.float32),
          "fp32": (torch.float32, torch.float32)}  # fmt: skip
DEFAULT_TOKENS = (64, 8192)
DEFAULT_SHAPE = (4096, 4096)
DEFAULT_RANK = 16
DEFAULT_DTYPES = ("bf16", "bf16+fp32")
DEFAULT_DROPOUTS = (0.0, 0.1)
DECODE_MAX_M = 64

# lora_linear with a backend; "auto->triton": auto after it has decided on triton (the cached
# look-up every later call runs); PEFT's own lora.Linear; PEFT after patch_peft(backend=...).
SUBJECTS = ("torch", "triton", "cuda", "auto", "auto->triton", "peft", "peft+patch(auto)", "peft+patch(triton)")
OPS = ("forward", "backward", "decode")




def default_problems() -> list[Problem]:
    K, N = DEFAULT_SHAPE
    return [Problem(M, K, N, DEFAULT_RANK, dtype, p) for M in DEFAULT_TOKENS for dtype in DEFAULT_DTYPES
            for p in DEFAULT_DROPOUTS]  # fmt: skip


def ops_of(problem: Problem) -> tuple[str, ...]:
    """Decode (an inference forward, dropout off) for M ≤ 64 without dropout; forward and backward always."""
    if problem.M <= DECODE_MAX_M and not problem.dropout:
        return OPS
    return OPS[:2]


def not_measurable(subject: str) -> str | None:
    """Why ``subject`` cannot be counted on this machine, or None."""
    from ..ops.registry import backend_state

    if subject == "cuda":
        state = backend_state("cuda")
        if isinstance(state, str):
            return f"the cuda backend's host code is C++ in fastlora._C, which cannot run here ({state})"
        return "the cuda backend's host code runs only on CUDA tensors (no GPU here)"
    if subject.startswith("peft"):
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed"
    if "triton" in subject and isinstance(backend_state("triton"), str):
        return f"triton: {backend_state('triton')}"
    return None


@contextlib.contextmanager
def fused_on_cpu():
    """The triton backend accepts CPU tensors within the block (its launches are stubbed by the
    census, so nothing runs on them); everything else about the call is unchanged."""
    from ..ops import registry

    state = registry.backend_state("triton")
    if isinstance(state, str):
        yield
        return
    registry._loaded["triton"] = state._replace(runs_on=None)
    try:
        yield
    finally:
        registry._loaded["triton"] = state


@contextlib.contextmanager
def auto_decided(backend: str):
    """``backend="auto"`` decides on ``backend`` for every problem class first met in the block (its
    timing is not run); the decisions made before and in the block are restored after."""
    from ..ops import auto

    saved_decided, saved_decide = dict(auto._decided), auto._decide
    auto._decided.clear()
    auto._decide = lambda *args: (auto._choice(backend, "census: decided without timing"), True)
    try:
        yield
    finally:
        auto._decide = saved_decide
        auto._decided.clear()
        auto._decided.update(saved_decided)


def _tensors(problem: Problem, device="cpu"):
    dtype, adapter_dtype = DTYPES[problem.dtype]
    x = torch.empty(problem.M, problem.K, dtype=dtype, device=device, requires_grad=True)
    weight = torch.empty(problem.N, problem.K, dtype=dtype, device=device)
    bias = torch.empty(problem.N, dtype=dtype, device=device)
    lora_A = torch.empty(problem.r, problem.K, dtype=adapter_dtype, device=device, requires_grad=True)
    lora_B = torch.empty(problem.N, problem.r, dtype=adapter_dtype, device=device, requires_grad=True)
    return x, weight, bias, lora_A, lora_B


def peft_layer(problem: Problem, patch: str | None, device="cpu") -> nn.Module:
    """A one-layer PEFT model (``lora.Linear`` over an ``nn.Linear`` with bias), patched with
    ``patch_peft(backend=patch)`` unless ``patch`` is None; the LoRA layer itself is returned."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from ..peft_integration import patch_peft

    dtype, adapter_dtype = DTYPES[problem.dtype]
    base = nn.Sequential(nn.Linear(problem.K, problem.N, device=device, dtype=dtype))
    config = LoraConfig(r=problem.r, lora_alpha=2 * problem.r, target_modules=["0"], lora_dropout=problem.dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config, autocast_adapter_dtype=adapter_dtype == torch.float32)
    if patch is not None:
        assert patch_peft(model, backend=patch) == 1
    layer = model.base_model.model[0]
    return layer


class Subject(NamedTuple):
    call: Callable[[], torch.Tensor]
    inputs: tuple
    module: nn.Module | None = None  # train() / eval() for a PEFT layer


def make_subject(name: str, problem: Problem, device="cpu") -> Subject:
    """The census's ``name`` on ``problem`` (see ``SUBJECTS``)."""
    from ..functional import lora_linear

    if name.startswith("peft"):
        patch = None if name == "peft" else name[len("peft+patch("):-1]
        layer = peft_layer(problem, patch, device)
        x = torch.empty(problem.M, problem.K, dtype=DTYPES[problem.dtype][0], device=device, requires_grad=True)
        adapter = layer.active_adapters[0]
        inputs = (x, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
        return Subject(lambda: layer(x), inputs, layer)
    backend = "auto" if name.startswith("auto") else name
    x, weight, bias, lora_A, lora_B = _tensors(problem, device)
    scaling, p = 2.0, problem.dropout

    def call():
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout=p if torch.is_grad_enabled() else 0.0,
                           backend=backend)  # fmt: skip

    return Subject(call, (x, lora_A, lora_B))


# --arch → the GPU whose limits (SM count, shared memory, capability) the launchers see.
ARCHS = {"90a": (9, 0), "80": (8, 0), "100a": (10, 0), "120": (12, 0)}


def subject_context(name: str, arch: str = "90a"):
    """The context a subject runs in: ``arch``'s limits standing in for the device's (grids, splits
    and TMA are sized for it, as ``fastlora inspect`` does), fused backends on CPU tensors, auto's
    decision for auto->X."""
    from ..ops._device import KNOWN_LIMITS, target_limits

    stack = contextlib.ExitStack()
    stack.enter_context(target_limits(KNOWN_LIMITS[ARCHS[arch]]))
    stack.enter_context(fused_on_cpu())
    if "->" in name:
        stack.enter_context(auto_decided(name.split("->")[1]))
    return stack
