"""DoRA's forward on the triton backend in one kernel pass: the column factor ``m/n`` (and the bias)
applied on the fp32 accumulator in the forward kernel's epilogue (``_split_k_reduce_kernel`` for
split-K decode), against a float64 reference of the output and of every gradient.

A dispatch mode sees every aten op on an M×N tensor during the forward: on the triton backend no
elementwise pass touches y; the same mode sees the torch backend's ``mul``/``addcmul``, so it can fail.
A spy on the launches shows which epilogue applied the factor, so that a path silently not taken fails.
"""

import pytest
import torch
from helpers import backends_on, poisoned, rel_error, tolerance  # noqa: F401  (poisoned: the fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from fastlora import dora

if "triton" not in backends_on("cpu"):
    pytest.skip("needs the triton backend (or TRITON_INTERPRET=1)", allow_module_level=True)

from fastlora.ops import triton_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned")  # every buffer the kernels write starts as NaN

DTYPES = [  # (base dtype, adapter and magnitude dtype)
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters"),
]
# (M, K): decode split over K (M ≤ 64, K ≥ 1024: 2 splits on the interpreter's 4 "SMs"), M ≤ 64 in
# one pass (K too short to split), M > 64. N = 29 throughout. All odd but M = 70.
SHAPES = [(1, 1031, True), (37, 1031, True), (37, 45, False), (70, 45, False)]
ARITHMETIC = {"mul", "add", "addcmul", "div", "sub", "mul_", "add_", "addcmul_", "div_", "sub_"}


class OpsOnShape(TorchDispatchMode):
    """The name of every aten op with an operand or result of exactly ``shape``."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        if any(isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape for t in leaves):
            self.seen.append(func.overloadpacket.__name__)
        return out


@pytest.fixture
def col_scale_launches(monkeypatch):
    """``(kernel, SPLIT_K, HAS_COL_SCALE)`` of every forward-kernel and split-K reduce launch."""
    seen = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.name, kwargs.get("SPLIT_K", True), kwargs["HAS_COL_SCALE"]))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_lora, "_lora_gemm", Spy("gemm", triton_lora._lora_gemm))
    monkeypatch.setattr(triton_lora, "_split_k_reduce_kernel", Spy("reduce", triton_lora._split_k_reduce_kernel))
    return seen


def dora_inputs(M, K, N, r, dtype, adapter_dtype, bias, seed):
    """x, W, b, A, B, m with a random B and m = ‖W + sBA‖ × U(0.5, 1.5) (so that m/n ≠ 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, generator=g) * 0.3).to(adapter_dtype)
    n = (W.double() + SCALING * B.double() @ A.double()).norm(dim=1)
    m = (n * (torch.rand(N, generator=g, dtype=torch.float64) + 0.5)).to(adapter_dtype)
    return x, W, b, A, B, m


SCALING = 1.5


def reference64(x, W, b, A, B, m):
    """PEFT's DoRA without dropout in float64: ``(m/n) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``, n detached."""
    n = (W + SCALING * B @ A).norm(dim=1).detach()
    y = (m / n) * (x @ W.t() + SCALING * (x @ A.t()) @ B.t())
    return y if b is None else y + b


@pytest.mark.parametrize("dtype, adapter_dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M, K, split", SHAPES, ids=["decode-split-M1", "decode-split-M37", "M37", "M70"])
def test_triton_dora_forward_is_one_pass(col_scale_launches, dtype, adapter_dtype, bias, M, K, split):
    N, r = 29, 5
    inputs = dora_inputs(M, K, N, r, dtype, adapter_dtype, bias, seed=M + K)
    x, W, b, A, B, m = inputs
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, m)]
    with OpsOnShape((M, N)) as ops:
        y = dora.dora_linear(leaves[0], W, b, leaves[1], leaves[2], leaves[3], SCALING, backend="triton")
    assert not ARITHMETIC & set(ops.seen), ops.seen  # no elementwise pass over y
    if split:
        assert col_scale_launches == [("gemm", True, False), ("reduce", True, True)]
    else:
        assert col_scale_launches == [("gemm", False, True)]

    x64, W64, A64, B64, m64 = (t.detach().double().requires_grad_(True) for t in (x, W, A, B, m))
    y64 = reference64(x64, W64, None if b is None else b.double(), A64, B64, m64)
    tol = tolerance(dtype, "cpu")
    assert y.dtype == dtype and rel_error(y, y64) <= tol, rel_error(y, y64)

    # The backward recovers pre from the y this epilogue stored: every gradient against float64.
    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(gy)
    grads64 = torch.autograd.grad(y64, [x64, A64, B64, m64], gy.double())
    for name, leaf, g64 in zip(("x", "A", "B", "m"), leaves, grads64):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert rel_error(leaf.grad, g64) <= tol, (name, rel_error(leaf.grad, g64))


def test_torch_backend_pass_is_seen():
    """The dispatch mode above can fail: the torch backend's separate pass over y is an M×N ``mul``
    (no bias) or ``addcmul`` (bias)."""
    M, N = 6, 29
    for bias in (True, False):
        x, W, b, A, B, m = dora_inputs(M, 40, N, 4, torch.float32, torch.float32, bias, seed=3)
        with OpsOnShape((M, N)) as ops:
            dora.dora_linear(x, W, b, A, B, m, SCALING, backend="torch")
        assert ARITHMETIC & set(ops.seen), ops.seen


def test_triton_epilogue_matches_the_separate_pass():
    """fp32: the fused epilogue equals the unfused composition over the same kernel's output (to the
    rounding of the last multiply-add), and ``xa`` is unchanged by the factor."""
    x, W, b, A, B, m = dora_inputs(37, 45, 29, 5, torch.float32, torch.float32, True, seed=11)
    scale = m / dora.weight_norm(W, A, B, SCALING)
    fused, xa = triton_lora.triton_forward_scaled(x, W, b, A, B, SCALING, 0.0, None, scale)
    pre, xa_plain = triton_lora.triton_forward(x, W, None, A, B, SCALING, 0.0, None)
    assert torch.equal(xa, xa_plain)
    torch.testing.assert_close(fused, torch.addcmul(b, pre, scale), rtol=1e-6, atol=1e-6)


def test_triton_forward_scaled_rejects_a_bad_col_scale():
    x, W, b, A, B, m = dora_inputs(4, 16, 8, 2, torch.float32, torch.float32, True, seed=1)
    with pytest.raises(ValueError, match="col_scale must be a \\[8\\] tensor"):
        triton_lora.triton_forward_scaled(x, W, b, A, B, SCALING, 0.0, None, torch.ones(7))
    with pytest.raises(TypeError, match="col_scale must be floating point"):
        triton_lora.triton_forward_scaled(x, W, b, A, B, SCALING, 0.0, None, torch.ones(8, dtype=torch.int32))
