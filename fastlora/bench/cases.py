"""What is measured: layer shapes from real models, the grids of cases, and each case's inputs.

A case is one (mode, M tokens, K→N layer, rank r, dtype, device). Modes:

``forward``  the training forward: ``x``, ``lora_A``, ``lora_B`` require grad, so the graph is built.
``backward`` the backward alone, ``y.backward(dy)`` of a forward done before the clock starts.
``train``    forward + backward, the training step of a frozen layer with a LoRA adapter.
``decode``   inference: the forward under ``torch.no_grad()``, with few tokens (M ∈ {1, 16, 64}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("forward", "backward", "train", "decode")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# scaling = alpha / r with alpha = 2r, a common choice; it keeps the low-rank term as large as the
# base term, so that a provider that drops or mis-scales it fails the check.
SCALING = 2.0


@dataclass(frozen=True)
class Shape:
    """A linear layer ``K → N`` (``in_features → out_features``); ``tokens`` fixes M when given."""

    name: str
    K: int
    N: int
    tokens: int | None = None


SHAPE_PRESETS = {
    "llama3-8b": (
        Shape("llama3-8b q/o", 4096, 4096),
        Shape("llama3-8b k/v", 4096, 1024),
        Shape("llama3-8b gate/up", 4096, 14336),
        Shape("llama3-8b down", 14336, 4096),
    ),
    "70b": (Shape("70b gate/up", 8192, 28672),),
    "small-cpu": (Shape("1024x1024", 1024, 1024), Shape("2048x2048", 2048, 2048)),
    "tiny": (Shape("256x256", 256, 256),),
}


@dataclass(frozen=True)
class Grid:
    """A product of shapes × tokens × ranks × dtypes × modes; decode uses ``decode_tokens``."""

    shapes: tuple[str, ...]
    tokens: tuple[int, ...]
    ranks: tuple[int, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...] = MODES
    decode_tokens: tuple[int, ...] = (1, 16, 64)


# "smoke" keeps `pytest benchmarks/ --benchmark-disable` fast; "default" is what `fastlora bench`
# runs (GPU: 90 cases); "full" is the whole grid of issue 3 (GPU: 720 cases, hours, most of them
# spent compiling the `compiled` provider afresh for each case).
GRIDS = {
    "cpu": {
        "smoke": Grid(("1024x1024",), (64,), (16,), ("fp32",), decode_tokens=(1,)),
        "default": Grid(("small-cpu",), (1, 64, 512), (16,), ("fp32",)),
        "full": Grid(("small-cpu",), (1, 64, 512), (8, 16, 64, 128), ("fp32",)),
    },
    "cuda": {
        "smoke": Grid(("llama3-8b",), (1024,), (16,), ("bf16",), decode_tokens=(1,)),
        "default": Grid(("llama3-8b", "70b"), (1, 64, 1024, 8192, 16384), (16,), ("bf16",)),
        "full": Grid(("llama3-8b", "70b"), (1, 64, 1024, 8192, 16384), (8, 16, 64, 128), ("bf16", "fp16")),
    },
}


def parse_shapes(spec: str) -> tuple[Shape, ...]:
    """``"llama3-8b,4096x1024,8x4096x4096"``: preset names, ``KxN`` or ``MxKxN``."""
    shapes = []
    for item in spec.split(","):
        item = item.strip()
        if item in SHAPE_PRESETS:
            shapes.extend(SHAPE_PRESETS[item])
            continue
        try:
            dims = [int(d) for d in item.lower().split("x")]
        except ValueError:
            dims = []
        if len(dims) not in (2, 3) or min(dims) < 1:
            presets = ", ".join(SHAPE_PRESETS)
            raise ValueError(f"shape {item!r} is neither a preset ({presets}) nor KxN nor MxKxN")
        *tokens, K, N = dims
        shapes.append(Shape(item, K, N, tokens[0] if tokens else None))
    return tuple(shapes)


@dataclass(frozen=True)
class Case:
    mode: str
    M: int
    shape: Shape
    r: int
    dtype: str
    device: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.mode} M={self.M} {self.shape.K}→{self.shape.N} r={self.r} {self.dtype}"

    def flops(self, lora: bool) -> int:
        """Multiply-adds ×2 of the math the mode needs; ``lora=False``: the base layer alone.

        Forward: ``2MKN`` (+ ``2MKr + 2MrN`` for the adapter). Backward with ``W`` frozen:
        ``grad_x = dy W`` is ``2MNK``; the adapter adds ``dy B``, ``(dy B) A``, ``(dy B)ᵀ x`` and
        ``dyᵀ (x Aᵀ)``: ``4MNr + 4MKr``. Recomputation is not counted.
        """
        M, K, N, r = self.M, self.shape.K, self.shape.N, self.r
        forward = 2 * M * K * N + (2 * M * r * (K + N) if lora else 0)
        backward = 2 * M * N * K + (4 * M * r * (K + N) if lora else 0)
        return {"forward": forward, "decode": forward, "backward": backward, "train": forward + backward}[self.mode]


def make_cases(grid: Grid, device: str, shapes: tuple[Shape, ...] | None = None) -> list[Case]:
    """Every case of ``grid`` (its shapes replaced by ``shapes`` when given), grouped by mode."""
    shapes = shapes or parse_shapes(",".join(grid.shapes))
    cases = []
    for mode in grid.modes:
        for dtype in grid.dtypes:
            for shape in shapes:
                tokens = (shape.tokens,) if shape.tokens else grid.decode_tokens if mode == "decode" else grid.tokens
                for r in grid.ranks:
                    cases.extend(Case(mode, M, shape, r, dtype, device) for M in tokens)
    return cases


@dataclass
class LoRAInputs:
    """One set of inputs of ``y = x Wᵀ + scaling·(x Aᵀ) Bᵀ`` and the output gradient ``dy``.

    ``make_inputs`` gives no bias, like the projections of Llama-class models, and a random
    ``lora_B``, not PEFT's zero init, so that the low-rank branch counts in every result.
    """

    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    dy: torch.Tensor
    bias: torch.Tensor | None = None
    scaling: float = SCALING

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.weight, self.lora_A, self.lora_B, self.dy))


def make_inputs(case: Case, seed: int = 0) -> LoRAInputs:
    """Inputs of ``case`` on its device; entries of order 1 in ``x``, ``y`` and every gradient."""
    M, K, N, r = case.M, case.shape.K, case.shape.N, case.r
    gen = torch.Generator(device=case.device).manual_seed(seed)

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        t = torch.randn(*size, generator=gen, device=case.device, dtype=torch.float32) * std
        return t.to(case.torch_dtype)

    return LoRAInputs(
        x=randn(M, K).requires_grad_(case.mode != "decode"),
        weight=randn(N, K, std=1 / math.sqrt(K)),
        lora_A=randn(r, K, std=1 / math.sqrt(K)).requires_grad_(),
        lora_B=randn(N, r, std=1 / math.sqrt(r)).requires_grad_(),
        dy=randn(M, N),
    )
