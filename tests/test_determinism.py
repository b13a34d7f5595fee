"""Under ``torch.use_deterministic_algorithms(True)`` two identical forward+backward runs give
bit-identical outputs and gradients on every backend.

The Triton kernels are deterministic by construction: every output tile of ``_lora_gemm_kernel``
is computed by one program whatever program that is, and the adapter gradients are fp32 partials
(per row block or split of M) that one finalize kernel sums in a fixed order afterwards; nothing is
accumulated with atomics (the only atomics are the flags that publish ``x Aᵀ`` to consumer tiles).
(Bit-equality holds within a process: on a GPU the autotuner may pick another tile shape in another
process.)
"""

import pytest
import torch
from helpers import BACKEND_DEVICE, make_inputs, rel_error, tolerance

import fastlora


@pytest.fixture
def deterministic(monkeypatch):
    # cuBLAS refuses deterministic mode unless its workspace is fixed.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def forward_backward(inputs, grad_out, dropout: float, backend: str, seed: int = 0):
    with torch.random.fork_rng():  # dropout's mask is drawn from torch's generator; leave it as it was
        torch.manual_seed(seed)
        out = fastlora.lora_linear(*inputs, 1.5, dropout=dropout, backend=backend)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], grad_out)
    return out, grads


def make_case(dtype, device):
    # 300 rows: the adapter-gradient reduction splits M (64-row blocks) into several partials.
    inputs = make_inputs(300, 70, 45, 8, dtype, device)
    grad_out = torch.randn(300, 45, dtype=dtype, device=device)
    return inputs, grad_out


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_two_runs_are_bit_identical(backend, device, dtype):
    inputs, grad_out = make_case(dtype, device)
    out, grads = forward_backward(inputs, grad_out, 0.0, backend)
    out_again, grads_again = forward_backward(inputs, grad_out, 0.0, backend)
    ref = fastlora.reference.lora_linear(*[None if t is None else t.detach().double() for t in inputs], 1.5)
    assert rel_error(out, ref) <= tolerance(dtype, device)  # identical and right, not identically wrong
    assert torch.equal(out, out_again)
    for g, g_again in zip(grads, grads_again, strict=True):
        assert torch.equal(g, g_again)


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_dropout_is_reproducible_under_manual_seed(backend, device):
    inputs, grad_out = make_case(torch.float32, device)
    out, grads = forward_backward(inputs, grad_out, 0.3, backend, seed=7)
    out_again, grads_again = forward_backward(inputs, grad_out, 0.3, backend, seed=7)
    assert torch.equal(out, out_again)
    for g, g_again in zip(grads, grads_again, strict=True):
        assert torch.equal(g, g_again)
    other_seed, _ = forward_backward(inputs, grad_out, 0.3, backend, seed=8)
    assert not torch.equal(out, other_seed)
