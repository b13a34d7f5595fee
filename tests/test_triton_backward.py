"""The Triton backward's cost outside its kernels (issue 20: at most 3 launches, with the partial sums
and casts folded into the kernels) and the finalize launch that makes it so (``_triton_finalize``).

Counted under the interpreter: a spy on the interpreter's launch records each kernel (and fails one
made outside ``on_device``), and a ``TorchDispatchMode`` records every ATen op the backward issues
outside the kernels (the interpreter's own tensor copies while a kernel runs are not the call's, so
the mode is paused then), classified as the census classifies them. Then the gradients, against the
float64 reference on odd shapes with every buffer poisoned (NaN) first, and the finalize kernel alone
(sums over many partial rows, running sums, mixed dtypes, bit-identical reruns).
"""

import threading

import pytest
import torch
from helpers import check_against_reference, make_inputs, poisoned, rel_error, spy_on_launches, tolerance  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from fastlora.census.counting import op_kind

triton_lora = pytest.importorskip("fastlora.ops.triton_lora")
from fastlora.ops import _triton_common, _triton_finalize  # noqa: E402

if not triton_lora.INTERPRET and not torch.cuda.is_available():
    pytest.skip("the triton backend runs on the CPU only under the interpreter", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Census(TorchDispatchMode):
    """ATen ops by kind (``op_kind``), not counting those made while ``paused.depth`` (a kernel runs)."""

    def __init__(self, paused):
        super().__init__()
        self.paused = paused
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(self.paused, "depth", 0):
            self.ops.append((op_kind(func), str(func)))
        return func(*args, **(kwargs or {}))

    def of_kind(self, *kinds):
        return [name for kind, name in self.ops if kind in kinds]


@pytest.fixture
def counted(monkeypatch):
    """``(launches, census)``: the kernels launched (a launch outside ``on_device`` fails) and a
    ``_Census`` that does not see the kernels' own ops."""
    if not triton_lora.INTERPRET:
        pytest.skip("the launch spy needs TRITON_INTERPRET=1")
    state = threading.local()
    launches = spy_on_launches(monkeypatch, during_launch=state)
    return launches, _Census(state)


def _backward_counted(counted, inputs, grad_out, dropout=0.0):
    import fastlora

    launches, census = counted
    out = fastlora.lora_linear(*inputs, 1.5, dropout=dropout, backend="triton")
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    launches.clear()
    with census:
        grads = torch.autograd.grad(out, wanted, grad_out)
    return grads, launches, census


@pytest.mark.parametrize(
    "dtype, adapter_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)], ids=str
)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_backward_is_three_launches_and_no_aten_compute(counted, dtype, adapter_dtype, dropout, bias):
    inputs = make_inputs(70, 40, 72, 4, dtype, DEVICE, bias=bias, adapter_dtype=adapter_dtype)
    grad_out = torch.randn(70, 72, dtype=dtype, device=DEVICE)
    grads, launches, census = _backward_counted(counted, inputs, grad_out, dropout)
    assert launches == ["_lora_gemm_kernel", "_lora_reduce_kernel", "_finalize_kernel"]
    assert census.of_kind("memset") == [] and census.of_kind("compute", "scalar") == []
    assert census.of_kind("alloc"), "the gradients' buffers are allocated (so the mode saw the backward)"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("need", ["A", "B", "bias", "x"])
def test_fewer_gradients_fewer_launches(counted, need):
    x, w, b, A, B = make_inputs(37, 24, 40, 3, torch.float32, DEVICE)
    for name, t in zip(["x", "bias", "A", "B"], [x, b, A, B]):
        t.requires_grad_(name == need)
    grads, launches, census = _backward_counted(counted, (x, w, b, A, B), torch.randn(37, 40, device=DEVICE))
    want = {
        "A": ["_lora_gemm_kernel", "_lora_reduce_kernel", "_finalize_kernel"],  # the gy pass makes gy B
        "B": ["_lora_gemm_kernel", "_finalize_kernel"],
        "bias": ["_lora_gemm_kernel", "_finalize_kernel"],
        "x": ["_lora_gemm_kernel"],
    }[need]
    assert launches == want
    assert census.of_kind("memset", "compute", "scalar") == []


def test_several_row_slices_add_two_launches_each(counted, monkeypatch):
    # One row block a slice: 4 slices of 64 rows (the interpreter's BLOCK_M) for M = 200.
    monkeypatch.setattr(triton_lora, "_MIN_PARTIAL_BLOCKS", 1)
    monkeypatch.setattr(triton_lora, "_MAX_PARTIAL_BYTES", 4 * 40 * 6)
    inputs = make_inputs(200, 48, 40, 6, torch.float32, DEVICE)
    grad_out = torch.randn(200, 40, device=DEVICE)
    grads, launches, census = _backward_counted(counted, inputs, grad_out)
    slices = 4
    assert launches.count("_lora_gemm_kernel") == slices
    assert launches.count("_finalize_kernel") == slices  # one after each slice but the last, then the last
    assert len(launches) == 2 * slices + 1
    assert census.of_kind("memset", "compute", "scalar") == []
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    from fastlora import reference

    ref = reference.lora_linear(*inputs64, 1.5)
    grads64 = torch.autograd.grad(ref, [inputs64[i] for i in (0, 2, 3, 4)], grad_out.double())
    for g, g64 in zip(grads, grads64, strict=True):
        assert rel_error(g, g64) <= tolerance(torch.float32, DEVICE)


CASES = [(1, 45, 67, 1), (37, 67, 45, 16), (200, 33, 29, 64)]
DTYPES = [
    (torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
]  # fmt: skip


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("m, k, n, r", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype, adapter_dtype", DTYPES, ids=str)
def test_adapter_gradients_against_float64(m, k, n, r, dtype, adapter_dtype):
    check_against_reference(make_inputs(m, k, n, r, dtype, DEVICE, adapter_dtype=adapter_dtype), 1.5, "triton")


@pytest.mark.usefixtures("poisoned")
def test_repeated_backward_is_bit_identical_across_slices(monkeypatch):
    monkeypatch.setattr(triton_lora, "_MIN_PARTIAL_BLOCKS", 1)
    monkeypatch.setattr(triton_lora, "_MAX_PARTIAL_BYTES", 4 * 40 * 6)
    x, w, b, A, B = (t.detach() for t in make_inputs(150, 48, 40, 6, torch.bfloat16, DEVICE))
    gy = torch.randn(150, 40, dtype=torch.bfloat16, device=DEVICE)
    _, xa = triton_lora.triton_forward(x, w, b, A, B, 1.5, 0.0, None)
    first = triton_lora.triton_backward(gy, x, xa, w, A, B, 1.5, 0.0, None, True, True, True, True)
    again = triton_lora.triton_backward(gy, x, xa, w, A, B, 1.5, 0.0, None, True, True, True, True)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("poisoned")
def test_finalize_sums_three_outputs_with_running_sums():
    g = torch.Generator().manual_seed(3)
    # 19 partial rows (two full chunks of 8 and a tail), sizes off the 512-element block, one of 1.
    parts = [torch.randn(19, 37, 29, generator=g), torch.randn(3, 1, generator=g), torch.randn(9, 1030, generator=g)]
    running = torch.randn(1030, generator=g)
    want = [
        (2.5 * parts[0].double().sum(0)),
        parts[1].double().sum(0),
        -0.5 * (running.double() + parts[2].double().sum(0)),
    ]
    outs = [_triton_common._empty((37, 29), torch.bfloat16, DEVICE), _triton_common._empty((1,), torch.float16, DEVICE)]
    run = running.clone().to(DEVICE)
    jobs = [(parts[0].to(DEVICE), outs[0], 2.5, None), (parts[1].to(DEVICE), outs[1], 1.0, None),
            (parts[2].to(DEVICE), run, -0.5, run)]  # fmt: skip
    _triton_finalize.finalize_sums(jobs)
    for out, ref in zip([*outs, run], want, strict=True):
        assert out.shape == ref.shape
        assert rel_error(out, ref) <= tolerance(out.dtype, DEVICE), out.dtype
    again = _triton_common._empty((37, 29), torch.bfloat16, DEVICE)
    _triton_finalize.finalize_sums([(parts[0].to(DEVICE), again, 2.5, None)])
    assert torch.equal(again, outs[0])  # the same bits alone as beside other outputs


def test_finalize_sums_rejects_mismatched_partials():
    out = torch.empty(4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="partials"):
        _triton_finalize.finalize_sums([(torch.zeros(3, 4, 6, device=DEVICE), out, 1.0, None)])
    with pytest.raises(ValueError, match="partials"):
        _triton_finalize.finalize_sums([(torch.zeros(3, 4, 5, dtype=torch.float16, device=DEVICE), out, 1.0, None)])
    with pytest.raises(ValueError, match="at most 3"):
        _triton_finalize.finalize_sums([(torch.zeros(1, 4, 5, device=DEVICE), out, 1.0, None)] * 4)
