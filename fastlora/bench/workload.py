"""A provider set up for one case: the timed step of the case's mode, and its check against the
float64 reference (output, and the gradients of ``x``, ``lora_A``, ``lora_B`` when the mode has
a backward).

On a GPU the workload holds several copies of the inputs, each with its own layer, and each step
uses the next copy, so that every call reads ``x``, ``W`` and the adapters from memory rather than
from an L2 cache that the previous call warmed (in a model, other layers run in between).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference
from .._tolerance import rel_error, tolerance
from .cases import Case, LoRAInputs, make_inputs
from .providers import Layer, Provider
from .timing import Timed

MAX_COPIES = 16


class WrongResult(AssertionError):
    """A provider's output or gradients differ from the float64 reference beyond tolerance."""


def input_copies(case: Case) -> list[LoRAInputs]:
    """Enough input sets to span twice the GPU's L2 cache (at most ``MAX_COPIES``); one on the CPU."""
    first = make_inputs(case, seed=0)
    if case.device == "cpu":
        return [first]
    l2_bytes = torch.cuda.get_device_properties(case.device).L2_cache_size
    n = min(MAX_COPIES, max(1, math.ceil(2 * l2_bytes / first.nbytes)))
    return [first] + [make_inputs(case, seed=i) for i in range(1, n)]


def reference_results(inp: LoRAInputs, mode: str, lora: bool) -> dict[str, torch.Tensor]:
    """Float64 output ``y`` (and ``grad_x``, ``grad_lora_A``, ``grad_lora_B`` when ``mode`` has a
    backward) of the LoRA layer, or of the base layer alone when ``lora`` is False."""
    leaves = {name: getattr(inp, name).detach().double().requires_grad_() for name in ("x", "lora_A", "lora_B")}
    weight = inp.weight.double()
    bias = None if inp.bias is None else inp.bias.double()
    with torch.enable_grad():
        if lora:
            y = reference.lora_linear(leaves["x"], weight, bias, leaves["lora_A"], leaves["lora_B"], inp.scaling)
        else:
            y = F.linear(leaves["x"], weight, bias)
        results = {"y": y.detach()}
        if mode in ("backward", "train"):
            y.backward(inp.dy.double())
            wanted = ("x", "lora_A", "lora_B") if lora else ("x",)
            results.update({f"grad_{name}": leaves[name].grad for name in wanted})
    return results


class Workload:
    """``provider`` built on each input copy, and ``timed``: the mode's step and its untimed setup.

    The setup moves to the next copy and sets its gradients to None (``zero_grad(set_to_none=True)``);
    for ``backward`` it also runs the forward whose backward the step then runs.
    """

    def __init__(self, case: Case, provider: Provider, copies: list[LoRAInputs]):
        self.case = case
        provider.start_case()
        self.layers: list[Layer] = [provider.build(inp) for inp in copies]
        self.copies = copies
        self._i = -1
        self._y: torch.Tensor | None = None
        step = {"forward": self._forward, "backward": self._backward, "train": self._train, "decode": self._decode}
        self.timed = Timed(step[case.mode], self._setup)

    def _clear_grads(self, i: int) -> None:
        self.copies[i].x.grad = None
        for t in self.layers[i].adapters.values():
            t.grad = None

    def _setup(self) -> None:
        self._i = (self._i + 1) % len(self.layers)
        self._clear_grads(self._i)
        if self.case.mode == "backward":
            self._y = self.layers[self._i].forward(self.copies[self._i].x)

    def _forward(self) -> None:
        self.layers[self._i].forward(self.copies[self._i].x)

    def _decode(self) -> None:
        with torch.no_grad():
            self.layers[self._i].forward(self.copies[self._i].x)

    def _backward(self) -> None:
        self._y.backward(self.copies[self._i].dy)

    def _train(self) -> None:
        self.layers[self._i].forward(self.copies[self._i].x).backward(self.copies[self._i].dy)

    def errors(self, expected: dict[str, torch.Tensor]) -> dict[str, float]:
        """Relative error of each result in ``expected`` (see ``reference_results``), on copy 0."""
        layer, inp = self.layers[0], self.copies[0]
        self._clear_grads(0)
        with torch.set_grad_enabled(self.case.mode != "decode"):
            y = layer.forward(inp.x)
        actual = {"y": y.detach()}
        if "grad_x" in expected:
            y.backward(inp.dy)
            actual["grad_x"] = inp.x.grad
            actual.update({f"grad_{name}": t.grad for name, t in layer.adapters.items()})
            self._clear_grads(0)
        return {
            name: math.inf if actual.get(name) is None else rel_error(actual[name], want)
            for name, want in expected.items()
        }

    def check(self, expected: dict[str, torch.Tensor]) -> float:
        """The largest relative error; raises ``WrongResult`` above the dtype's tolerance."""
        errors = self.errors(expected)
        worst = max(errors.values())
        tol = tolerance(self.case.torch_dtype, self.case.device)
        if not worst <= tol:  # also catches NaN
            detail = ", ".join(f"{name} {err:.2e}" for name, err in errors.items())
            raise WrongResult(f"relative error {detail} (tolerance {tol:.0e})")
        return worst
