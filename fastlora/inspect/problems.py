"""What ``fastlora inspect`` compiles: the target archs, the problems (M, K, N, r, dtypes, dropout)
parsed from the command line, and the ``Row`` each kernel × arch × config becomes."""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import torch

# Arch names accepted by --arch → compute capability. Triton compiles capability 9.0 as sm_90a, 10.0 as
# sm_100a and 12.0 as sm_120a (``sm_arch_from_capability``: the "a" suffix from 9.0 on).
ARCHS = {"90a": (9, 0), "80": (8, 0), "100a": (10, 0), "120": (12, 0)}
_ARCH_ALIASES = {"90": "90a", "sm_90a": "90a", "sm_90": "90a", "sm90a": "90a", "sm_80": "80", "sm80": "80",
                 "100": "100a", "sm_100a": "100a", "sm_100": "100a", "sm100a": "100a",
                 "120a": "120", "sm_120": "120", "sm_120a": "120", "sm120": "120", "sm120a": "120"}  # fmt: skip
DTYPES = {  # name → (dtype of x and W, dtype of the adapters)
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16+fp32": (torch.bfloat16, torch.float32),  # PEFT's default: fp32 adapters on a bf16 base
    "fp16": (torch.float16, torch.float16),
    "fp16+fp32": (torch.float16, torch.float32),
    "fp32": (torch.float32, torch.float32),
}
# Llama-3-8B's anchor projections (q/o, gate/up, down), decode-sized and training-sized M.
DEFAULT_SHAPES = "4096x4096,4096x14336,14336x4096"
DEFAULT_TOKENS = (64, 8192)
DEFAULT_RANKS = (16, 64)
DEFAULT_DTYPES = ("bf16", "bf16+fp32")
DEFAULT_DROPOUTS = (0.0, 0.1)
SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS", "LDSM", "STL", "LDL")
_BUILD_HINT = "build it with `bash .ci/build_cuda.sh` (CUDA toolkit, no GPU needed)"


class Problem(NamedTuple):
    M: int
    K: int
    N: int
    r: int
    dtype: str
    dropout: float

    @property
    def label(self) -> str:
        return f"M{self.M} K{self.K} N{self.N} r{self.r} {self.dtype} p{self.dropout:g}"


@dataclasses.dataclass
class Row:
    """One kernel × arch × config (× specialisation for Triton), as compiled."""

    source: str  # the op module (fastlora.ops.triton_lora) or fastlora._C
    kernel: str
    arch: str
    config: str
    specialisation: dict
    pickable: bool
    via: list = dataclasses.field(default_factory=list)
    registers: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    sass: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    problems: list = dataclasses.field(default_factory=list)
    cubin: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def spills(self) -> bool:
        return bool(self.stack_bytes) or bool(self.sass.get("STL")) or bool(self.sass.get("LDL"))


def parse_archs(text: str) -> tuple[list[str], list[str]]:
    """(arch names, one message per item that is not one) from ``"90a,80"``."""
    archs, errors = [], []
    for item in filter(None, (i.strip().lower() for i in text.split(","))):
        name = _ARCH_ALIASES.get(item, item)
        if name in ARCHS:
            archs.append(name)
        else:
            errors.append(f"--arch: cannot target {item!r}; inspect compiles for {', '.join(ARCHS)}")
    return list(dict.fromkeys(archs)), errors


def parse_ints(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of positive integers")
    return values


def parse_floats(option: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0 <= v < 1 for v in values):
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of probabilities in [0, 1)")
    return values


def parse_dtypes(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in DTYPES]
    if unknown or not names:
        raise ValueError(f"--dtypes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(DTYPES)}")
    return names


def make_problems(shapes: str, tokens, ranks, dtypes, dropouts) -> list[Problem]:
    """Every combination; a shape ``MxKxN`` fixes its own M. Raises ValueError naming a bad shape."""
    from ..bench.cases import parse_shapes

    try:
        parsed = parse_shapes(shapes)
    except ValueError as err:
        raise ValueError(f"--shapes: {err}") from None
    problems = []
    for shape, r, dtype, p in itertools.product(parsed, ranks, dtypes, dropouts):
        for M in (shape.tokens,) if shape.tokens else tokens:
            problems.append(Problem(M, shape.K, shape.N, r, dtype, p))
    return list(dict.fromkeys(problems))
