"""LoRA dropout fused into every backend that runs here.

The mask is never exposed, so the tests recover it: with identity adapters and no base weight the
layer returns ``scaling·D(x)`` itself. Re-seeding torch's generator reproduces the same mask for a
call on an ``x`` of the same shape, which lets a second call with real adapters be compared to the
float64 formula with that mask, forward and every gradient.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKEND_DEVICE, make_inputs, poisoned, rel_error, tolerance  # noqa: F401

import fastlora

pytestmark = pytest.mark.usefixtures("poisoned")


def recover_mask(m: int, k: int, p: float, seed: int, backend: str, device: str) -> torch.Tensor:
    """The keep mask (0/1, float64) that a call on an x of shape [m, k] draws after manual_seed(seed)."""
    x = torch.rand(m, k, device=device, dtype=torch.float64).add_(0.5).float()  # no zeros
    eye = torch.eye(k, device=device)
    torch.manual_seed(seed)
    out = fastlora.lora_linear(x, torch.zeros_like(eye), None, eye, eye, 1.0, dropout=p, backend=backend)
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / (1 - p), rtol=1e-5), "kept elements must be scaled by 1/(1-p)"
    return kept.double()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_the_formula_with_the_same_mask(backend, device, dtype, p):
    m, k, n, r, scaling, seed = 45, 37, 29, 6, 1.5, 1234
    keep = recover_mask(m, k, p, seed, backend, device)
    x, w, b, A, B = make_inputs(m, k, n, r, dtype, device)
    torch.manual_seed(seed)
    out = fastlora.lora_linear(x, w, b, A, B, scaling, dropout=p, backend=backend)

    x64, w64, b64, A64, B64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b, A, B))
    ref = F.linear(x64, w64, b64) + scaling * F.linear(F.linear(x64 * keep / (1 - p), A64), B64)
    tol = tolerance(dtype, device)
    assert rel_error(out, ref) <= tol
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, b, A, B), grad_out)
    grads64 = torch.autograd.grad(ref, (x64, b64, A64, B64), grad_out.double())
    for name, g, g64 in zip(("x", "bias", "lora_A", "lora_B"), grads, grads64):
        assert rel_error(g, g64) <= tol, name


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_dropout_keeps_the_right_fraction(backend, device):
    p = 0.3
    keep = recover_mask(200, 64, p, 7, backend, device)
    # 12800 Bernoulli(0.7) draws: the kept fraction is within 5 sigma (~0.02) of 0.7.
    assert abs(keep.mean().item() - (1 - p)) < 0.02
    # Rows and columns are not copies of each other (the counter covers every element).
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_dropout_is_reproducible_under_manual_seed_and_fresh_otherwise(backend, device):
    x, w, b, A, B = make_inputs(16, 24, 12, 4, torch.float32, device)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(fastlora.lora_linear(x, w, b, A, B, 2.0, dropout=0.5, backend=backend))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_dropout_of_one_drops_the_whole_branch(backend, device):
    x, w, b, A, B = make_inputs(8, 16, 12, 4, torch.float32, device)
    out = fastlora.lora_linear(x, w, b, A, B, 2.0, dropout=1.0, backend=backend)
    assert torch.allclose(out, F.linear(x, w, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.1", True])
def test_bad_dropout_is_rejected(p):
    x, w, b, A, B = make_inputs(2, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="dropout"):
        fastlora.lora_linear(x, w, b, A, B, 1.0, dropout=p)
