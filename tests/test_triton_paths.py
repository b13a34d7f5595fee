"""Every path of the Triton kernels reached on the CPU (under the interpreter) and checked against
the float64 reference: tensor descriptors and pointer loads, Hopper and pre-Hopper choices, one
and several programs walking many tiles with the producer/consumer flags (several: consumers that
time out and compute t themselves), the split-K decode path, the fused
grad_B / bias partials (including the grad_B-only tile of a one-column grid) and the hi/lo split
of ``xa`` for half inputs at every rank.

A spy records the compile-time switches of each launch, so that a path silently not taken fails.
"""

import pytest
import torch
from helpers import check_against_reference, make_inputs, poisoned, rel_error, tolerance  # noqa: F401

from fastlora.ops._device import KNOWN_LIMITS, target_limits

triton_lora = pytest.importorskip("fastlora.ops.triton_lora")
if not triton_lora.INTERPRET and not torch.cuda.is_available():
    pytest.skip("the triton backend runs on the CPU only under the interpreter", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.fixture
def launches(monkeypatch):
    """The arguments and grid size of every ``_lora_gemm_kernel`` launch, in order."""
    seen = []

    class Spy:
        def __init__(self, tuned):
            self.tuned = tuned

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                config = triton_lora.INTERPRETER_CONFIGS[0].kwargs if triton_lora.INTERPRET else None
                named = dict(zip(triton_lora._lora_gemm_kernel.arg_names, args))
                seen.append({**named, **kwargs, "programs": grid(config)[0] if config else None})
                return self.tuned[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_lora, "_lora_gemm", Spy(triton_lora._lora_gemm))
    monkeypatch.setattr(triton_lora, "_lora_gemm_grad_x", Spy(triton_lora._lora_gemm_grad_x))
    return seen


def test_descriptors_for_aligned_operands_on_hopper(launches):
    # K = 64, N = 48 in fp16: every row 16-byte aligned. Forward and grad_x both on descriptors.
    check_against_reference(make_inputs(37, 64, 48, 5, torch.float16, DEVICE), 1.5, "triton")
    assert [launch["USE_TMA"] for launch in launches] == [True, True]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_pointer_loads_for_unaligned_or_strided_operands(launches, dtype):
    check_against_reference(make_inputs(37, 70, 45, 5, dtype, DEVICE), 1.5, "triton")  # 70·2 bytes a row
    assert [launch["USE_TMA"] for launch in launches] == [False, False]
    launches.clear()
    # Every other column of x: the forward loads x through pointers; grad_x (of contiguous gy) need not.
    check_against_reference(make_inputs(37, 64, 48, 5, dtype, DEVICE, x_noncontiguous=True), 1.5, "triton")
    assert [launch["USE_TMA"] for launch in launches] == [False, True]


def test_pointer_loads_before_hopper(launches):
    with target_limits(KNOWN_LIMITS[(8, 0)]):
        check_against_reference(make_inputs(37, 64, 48, 5, torch.bfloat16, DEVICE), 1.5, "triton")
    assert launches and not any(launch["USE_TMA"] for launch in launches)


@pytest.mark.parametrize("programs", [1, 4])
def test_programs_walk_every_tile_through_the_flags(launches, programs):
    # 3 row blocks × 4 column blocks of 64 (forward and grad_x). One program: every consumer finds its producer done (an
    # earlier tile of its own program); four: the interpreter's consumers whose producer is in a later
    # program time out and compute t themselves (tests/test_triton_safety.py counts them).
    with target_limits(KNOWN_LIMITS[(9, 0)]._replace(sm_count=programs)):
        check_against_reference(make_inputs(130, 200, 200, 7, torch.float32, DEVICE), 0.75, "triton")
    forward, grad_x = launches
    assert forward["programs"] == programs and not forward["SPLIT_K"]
    assert grad_x["programs"] == programs and grad_x["FUSE_GRAD_B"] and grad_x["BIAS_GRAD"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 5])
def test_decode_splits_k(launches, dtype, m):
    check_against_reference(make_inputs(m, 1024, 40, 8, dtype, DEVICE), 1.5, "triton")
    forward = launches[0]
    assert forward["SPLIT_K"] and forward["SPLITS"] > 1


def test_decode_dropout_draws_the_same_mask_as_the_full_kernel(monkeypatch):
    x, w, b, A, B = (t.detach() if t is not None else None for t in make_inputs(5, 1024, 40, 8, torch.float32, DEVICE))
    seed = torch.tensor(99)
    y_split, xa_split = triton_lora.triton_forward(x, w, b, A, B, 1.5, 0.4, seed)
    monkeypatch.setattr(triton_lora, "_DECODE_MAX_M", 0)
    y_full, xa_full = triton_lora.triton_forward(x, w, b, A, B, 1.5, 0.4, seed)
    assert rel_error(xa_split, xa_full) <= 1e-6 and rel_error(y_split, y_full) <= 1e-6


@pytest.mark.parametrize("need", ["B", "bias", "A", "B+bias"])
@pytest.mark.parametrize("n", [24, 200], ids=["one-column", "four-columns"])
def test_adapter_gradients_without_grad_x(need, n):
    # No grad_x: the gy pass runs without its output, for the requested partials only.
    x, w, b, A, B = make_inputs(70, 48, n, 6, torch.bfloat16, DEVICE)
    gy = torch.randn(70, n, dtype=torch.bfloat16, device=DEVICE)
    x, A, B = x.detach(), A.detach(), B.detach()
    _, xa = triton_lora.triton_forward(x, w, b, A, B, 1.5, 0.0, None)
    flags = dict(need_A="A" in need, need_B="B" in need, need_bias="bias" in need)
    grad_x, grad_A, grad_B, grad_bias = triton_lora.triton_backward(
        gy, x, xa, w, A, B, 1.5, 0.0, None, False, flags["need_A"], flags["need_B"], flags["need_bias"]
    )
    gy64, x64, A64, B64 = gy.double(), x.double(), A.double(), B.double()
    tol = tolerance(torch.bfloat16, DEVICE)
    assert grad_x.numel() == 0
    if flags["need_A"]:
        assert rel_error(grad_A, 1.5 * (gy64 @ B64).t() @ x64) <= tol
    if flags["need_B"]:
        assert rel_error(grad_B, 1.5 * gy64.t() @ (x64 @ A64.t())) <= tol
    if flags["need_bias"]:
        assert rel_error(grad_bias, gy64.sum(0)) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [1, 17, 100, 256])
def test_half_inputs_at_every_rank(dtype, r):
    # grad_B of half inputs multiplies gy by xa split in two halves of its mantissa (hi + lo).
    check_against_reference(make_inputs(45, 32, 40, r, dtype, DEVICE), 16 / r, "triton")


def test_fp16_grad_b_partials_scale_large_xa():
    # xa far beyond fp16's range: its hi/lo halves are scaled by a power of two per column first.
    x, w, b, A, B = make_inputs(40, 32, 24, 4, torch.float16, DEVICE, adapter_dtype=torch.float32)
    with torch.no_grad():
        x.abs_().mul_(40)
        A.fill_(128.0)
        B.mul_(1e-4)
    check_against_reference((x, w, b, A, B), 1.0, "triton")


def test_launch_for_inspection_runs_the_launchers(launches):
    triton_lora.launch_for_inspection(20, 64, 48, 4, torch.bfloat16, torch.float32, dropout=True, backward=True)
    # The forward, then the gy pass of each backward variant (fused, then split: both compiled by inspect).
    assert [launch["W_TRANS"] for launch in launches] == [True, False, False]
    assert [launch["FUSE_GRAD_B"] for launch in launches] == [False, True, False]
    assert launches[0]["DROPOUT"] == triton_lora.DROPOUT_ON_INPUT.value
    assert launches[1]["DROPOUT"] == launches[2]["DROPOUT"] == triton_lora.DROPOUT_ON_LOW_RANK.value


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gy_pass_in_several_launches(monkeypatch, p):
    # The fused grad_B partials are bounded by launching the gy pass on slices of rows: the result
    # (dropout mask included, which counts rows of the whole input) must not depend on the slicing.
    x, w, b, A, B = (t.detach() for t in make_inputs(200, 48, 40, 6, torch.float32, DEVICE))
    gy = torch.randn(200, 40, device=DEVICE)
    seed = torch.tensor(5) if p else None
    _, xa = triton_lora.triton_forward(x, w, b, A, B, 1.5, p, seed)
    whole = triton_lora.triton_backward(gy, x, xa, w, A, B, 1.5, p, seed, True, True, True, True)
    monkeypatch.setattr(triton_lora, "_MIN_PARTIAL_BLOCKS", 1)
    monkeypatch.setattr(triton_lora, "_MAX_PARTIAL_BYTES", 4 * 40 * 6)  # one row block a launch
    sliced = triton_lora.triton_backward(gy, x, xa, w, A, B, 1.5, p, seed, True, True, True, True)
    for a, b in zip(whole, sliced, strict=True):
        assert rel_error(b, a) <= 1e-6
    if not p:
        check_against_reference(make_inputs(200, 48, 40, 6, torch.float32, DEVICE), 1.5, "triton")
