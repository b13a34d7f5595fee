"""Host time per call on the CPU: tiny real tensors (K = N = 64, r = 8, fp32, M = 64 by default), so
that what is timed is the Python and dispatch path, not arithmetic; Triton launches are stubbed (they
cannot run here), so the triton rows are fastlora's path up to the launch, without Triton's own
launcher. Each figure is the minimum over many calls (``reps`` × ``rounds``), the least disturbed by
other processes; it is still a loaded machine's figure, to be read beside the ``uptime`` load.

Subjects: ``F.linear`` (the floor every row is also given over), ``nn.Linear`` (trainable weight),
PEFT's ``lora.Linear`` before and after ``patch_peft``, ``FusedLoRALinear`` with ``backend="torch"``
and ``"auto"``, ``lora_linear`` on triton (launch stubbed) and on auto after it decided triton.
Ops: ``forward`` (grad enabled, train mode), ``step`` (forward + backward of ``y`` with a given
``gy``; gradients cleared between calls, untimed), ``decode`` (no grad, eval mode).
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import lora_linear
from .counting import stubbed_triton
from .subjects import Problem, auto_decided, fused_on_cpu, peft_layer

HOST_SUBJECTS = ("F.linear", "nn.Linear", "peft", "peft+patch(auto)", "peft+patch(torch)", "FusedLoRALinear(torch)",
                 "FusedLoRALinear(auto)", "lora_linear(triton)", "lora_linear(auto->triton)")  # fmt: skip
HOST_OPS = ("forward", "step", "decode")


def _module(name: str, problem: Problem) -> nn.Module:
    from ..layers import FusedLoRALinear

    g = torch.Generator().manual_seed(0)
    if name == "nn.Linear":
        return nn.Linear(problem.K, problem.N)
    if name.startswith("peft"):
        patch = None if name == "peft" else name[len("peft+patch("):-1]
        layer = peft_layer(problem, patch)
        with torch.no_grad():  # PEFT starts lora_B at zero; any values do for timing
            layer.lora_B[layer.active_adapters[0]].weight.normal_(generator=g)
        return layer
    if name.startswith("FusedLoRALinear"):
        layer = FusedLoRALinear(problem.K, problem.N, r=problem.r, backend=name[len("FusedLoRALinear("):-1])
        with torch.no_grad():
            layer.lora_B.normal_(generator=g)
        return layer
    raise ValueError(name)


class _Functional(nn.Module):
    """``F.linear`` or ``lora_linear`` on one backend, as a module so that every subject is called alike."""

    def __init__(self, problem: Problem, backend: str | None):
        super().__init__()
        self.backend = backend
        self.weight = nn.Parameter(torch.randn(problem.N, problem.K) / problem.K**0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(problem.N), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(problem.r, problem.K) / problem.K**0.5)
        self.lora_B = nn.Parameter(torch.randn(problem.N, problem.r))

    def forward(self, x):
        if self.backend is None:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, 2.0, backend=self.backend)


def make_host_subject(name: str, problem: Problem) -> nn.Module:
    if name == "F.linear":
        return _Functional(problem, None)
    if name.startswith("lora_linear("):
        return _Functional(problem, name[len("lora_linear("):-1].split("->")[0])
    return _module(name, problem)


def _min_us(call, reps: int, rounds: int, between=None) -> float:
    best = float("inf")
    for _ in range(rounds):
        for _ in range(reps):
            start = time.perf_counter_ns()
            call()
            best = min(best, time.perf_counter_ns() - start)
            if between is not None:
                between()
    return best / 1000


def time_subject(name: str, problem: Problem, reps: int = 200, rounds: int = 3) -> dict:
    """``{op: µs}`` of one host subject, each op the minimum over ``reps`` × ``rounds`` calls."""
    from ..ops._device import KNOWN_LIMITS, target_limits

    with contextlib.ExitStack() as stack:
        stack.enter_context(target_limits(KNOWN_LIMITS[(9, 0)]))  # as the census: an H100's grids and splits
        stack.enter_context(fused_on_cpu())
        stack.enter_context(stubbed_triton(_Sink()))
        if "->" in name:
            stack.enter_context(auto_decided(name.split("->")[1].rstrip(")")))
        module = make_host_subject(name, problem)
        x = torch.randn(problem.M, problem.K, requires_grad=True)
        gy = torch.randn(problem.M, problem.N)
        params = [p for p in module.parameters() if p.requires_grad] + [x]

        def clear():
            for p in params:
                p.grad = None

        def step():
            module(x).backward(gy)

        out = {}
        gc.collect()
        gc.disable()
        try:
            module.train()
            out["forward"] = _min_us(lambda: module(x), reps, rounds)
            out["step"] = _min_us(step, reps, rounds, clear)
            module.eval()
            with torch.no_grad():
                out["decode"] = _min_us(lambda: module(x), reps, rounds)
        finally:
            gc.enable()
    return out


class _Sink(list):
    """The stubbed launches' record, kept empty so that thousands of timed calls do not grow it."""

    def append(self, item):
        pass


def host_table(problem: Problem | None = None, subjects=HOST_SUBJECTS, reps: int = 200, rounds: int = 3) -> dict:
    """``{"problem": label, "rows": {subject: {op: µs}}}`` at the tiny host problem."""
    problem = problem or Problem(64, 64, 64, 8, "fp32", 0.0)
    rows = {}
    for name in subjects:
        try:
            rows[name] = time_subject(name, problem, reps, rounds)
        except Exception as err:  # a subject that cannot run here is named, the others are still timed
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
    return {"problem": problem.label, "reps": reps, "rounds": rounds, "rows": rows, "triton_binder": triton_binder_us()}


def triton_binder_us(reps: int = 2000) -> dict | None:
    """µs of Triton's binder (``JITFunction.run``'s specialisation of every argument, which no stubbed
    row includes) for the dense forward's ``_lora_gemm_kernel`` launch (M 8192, K = N = 4096, r 16,
    bf16, sm_90a): a floor under each launch that only Triton can lower. The autotuner's key and
    cache look-up and the driver's launch come on top of it. None where triton cannot be loaded."""
    try:
        from triton import knobs

        from ..inspect.recording import intercepted_launches
        from ..ops import triton_lora
        from ..ops._device import KNOWN_LIMITS, target_limits
        from ..ops._triton_compile import _binder, target_of
    except Exception:
        return None
    launches: list = []
    with target_limits(KNOWN_LIMITS[(9, 0)]), intercepted_launches(launches):
        x, W = torch.empty(8192, 4096, dtype=torch.bfloat16), torch.empty(4096, 4096, dtype=torch.bfloat16)
        A, B = torch.empty(16, 4096, dtype=torch.bfloat16), torch.empty(4096, 16, dtype=torch.bfloat16)
        triton_lora.triton_forward(x, W, torch.empty(4096, dtype=torch.bfloat16), A, B, 1.0, 0.0, None)
    launch = next(l for l in launches if l.pickable)
    _, binder = _binder(launch.kernel, target_of((9, 0)))
    kwargs = {**launch.kwargs, "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    us = _min_us(lambda: binder(*launch.args, **kwargs), reps, 1)
    return {"kernel": "_lora_gemm_kernel", "arguments": len(launch.args) + len(launch.kwargs), "us": us}
