"""Property test: random shapes, layouts, dtypes, ranks, scalings and gradient needs, on every
backend runnable here, against the float64 reference (forward and every requested gradient).

The examples are pinned (derandomized: the same ones on every run), so a result does not depend on
the draw. ``FASTLORA_FUZZ_EXPLORE=1`` draws fresh ones, and ``FASTLORA_FUZZ_EXAMPLES=N`` sets how
many; a failure prints its drawn parameters, ``seed`` included, which rebuild the exact tensors.

The error bound is relative to the norms of the terms each result sums, not to the norm of the sum:
``‖out − ref‖ ≤ tol · Σ‖term‖``, with ``y = xWᵀ + b + s·(xAᵀ)Bᵀ`` and each gradient split alike.
Rounding error grows with the terms a kernel adds; where they cancel (random scalings up to 64
against a unit-sized base), ``‖ref‖`` is far below them, and a bound relative to it fails a
correct kernel.
"""

import os

import pytest
import torch
from helpers import BACKEND_DEVICE, make_inputs, poisoned, tolerance  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlora

pytestmark = pytest.mark.usefixtures("poisoned")

ON_GPU = torch.cuda.is_available()
EXPLORE = os.environ.get("FASTLORA_FUZZ_EXPLORE") == "1"
# Under the CPU interpreter a triton example costs ~0.1-2 s; on a GPU, new shapes cost autotuning.
MAX_EXAMPLES = int(os.environ.get("FASTLORA_FUZZ_EXAMPLES", 100 if ON_GPU else 40))

# Edge sizes (1 feature, 0 or 1 row), powers of two and their neighbours, primes: block multiples or not.
SIZES = st.one_of(st.sampled_from([1, 2, 15, 16, 17, 31, 37, 53, 64, 67]), st.integers(1, 70))
ROWS = st.one_of(st.sampled_from([0, 1, 63, 64, 65]), st.integers(0, 70))
# Mostly LoRA-sized ranks; one draw in four up to the fused backends' limit of 256.
RANKS = st.one_of(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40), st.integers(41, 256))
# Negative, zero and small scalings, but not so small that the adapter gradients (≈ scaling·√M)
# leave fp16's normal range, where no backend can hold them to the tolerance.
SCALINGS = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 2.0, 1e-3, -1e-3, 64.0]),
    st.builds(lambda magnitude, negative: -magnitude if negative else magnitude, st.floats(1e-3, 64), st.booleans()),
)
# How x is laid out in memory: the kernels take strides, so each must give the same numbers.
LAYOUTS = ["contiguous", "every_other_column", "column_major", "broadcast_rows"]
GRAD_NAMES = ["x", "weight", "bias", "lora_A", "lora_B"]


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    bias = draw(st.booleans())
    grad_names = [n for n in GRAD_NAMES if bias or n != "bias"]
    return {
        "lead": [draw(st.integers(0, 3)) for _ in range(draw(st.integers(0, 2)))] + [draw(ROWS)],
        "in_features": draw(SIZES),
        "out_features": draw(SIZES),
        "r": draw(RANKS),
        "dtype": dtype,
        # PEFT keeps fp32 adapters beside an fp16/bf16 base.
        "adapter_dtype": draw(st.sampled_from([dtype, torch.float32])),
        "bias": bias,
        "scaling": draw(SCALINGS),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "grads": draw(st.sets(st.sampled_from(grad_names), min_size=1)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def random_x(shape, dtype: torch.dtype, device: str, layout: str) -> torch.Tensor:
    """A leaf tensor of the given shape, fresh random values and memory layout."""
    *lead, k = shape
    if layout == "every_other_column":
        x = torch.randn(*lead, 2 * k, dtype=dtype, device=device)[..., ::2]
    elif layout == "column_major":
        x = torch.randn(*lead[:-1], k, lead[-1], dtype=dtype, device=device).transpose(-1, -2)
    elif layout == "broadcast_rows":  # stride 0 along the rows: every row is the same memory
        x = torch.randn(*lead[:-1], 1, k, dtype=dtype, device=device).expand(shape)
    else:
        x = torch.randn(shape, dtype=dtype, device=device)
    return x.detach()


def term_norms(inputs64, scaling: float, gy: torch.Tensor) -> dict[str, float]:
    """Σ‖term‖ of y and of each gradient, in float64: the scale their rounding error is bounded by."""
    x, w, b, A, B = inputs64
    x, gy = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    xa, gy_b = x @ A.t(), gy @ B

    def total(*terms):
        return sum(t.norm().item() for t in terms)

    return {
        "y": total(x @ w.t(), x.new_zeros(0) if b is None else b.expand(len(x), -1), scaling * xa @ B.t()),
        "x": total(gy @ w, scaling * gy_b @ A),
        "weight": total(gy.t() @ x),
        "bias": total(gy.sum(0)),
        "lora_A": total(scaling * gy_b.t() @ x),
        "lora_B": total(scaling * gy.t() @ xa),
    }


def check_within_term_bound(inputs, scaling: float, backend: str, gy: torch.Tensor) -> None:
    """Output and every requested gradient (for the output gradient ``gy``) of ``backend`` against
    the float64 reference, each within ``tol · Σ‖term‖``."""
    x = inputs[0]
    tol = tolerance(x.dtype, x.device)
    out = fastlora.lora_linear(*inputs, scaling, backend=backend)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], inputs[1].shape[0])
    inputs64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref = fastlora.reference.lora_linear(*inputs64, scaling)
    scale = term_norms([None if t is None else t.detach() for t in inputs64], scaling, gy.double())
    results = {"y": (out, ref)}
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], gy)
    grads64 = torch.autograd.grad(ref, [inputs64[i] for i in wanted], gy.double())
    for i, g, g64 in zip(wanted, grads, grads64):
        assert g.dtype == inputs[i].dtype, f"grad of {GRAD_NAMES[i]} has dtype {g.dtype}"
        results[GRAD_NAMES[i]] = (g, g64)
    for name, (got, want) in results.items():
        error = (got.double() - want).norm().item()
        assert error <= tol * scale[name], f"{name}: ‖error‖ {error:.3e} > {tol} × Σ‖term‖ {scale[name]:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=not EXPLORE,
    database=None if not EXPLORE else settings.default.database,  # pinned: no replays from a local store either
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases())
def test_matches_reference(backend, device, case):
    with torch.random.fork_rng():
        torch.manual_seed(case["seed"])
        x, weight, bias, lora_A, lora_B = make_inputs(
            case["lead"], case["in_features"], case["out_features"], case["r"], case["dtype"], device,
            bias=case["bias"], adapter_dtype=case["adapter_dtype"],
        )  # fmt: skip
        x = random_x(x.shape, case["dtype"], device, case["layout"])
        gy = torch.randn(*x.shape[:-1], case["out_features"], dtype=case["dtype"], device=device)
    inputs = (x, weight, bias, lora_A, lora_B)
    for name, tensor in zip(GRAD_NAMES, inputs):
        if tensor is not None:
            tensor.requires_grad_(name in case["grads"])
    check_within_term_bound(inputs, case["scaling"], backend, gy)
