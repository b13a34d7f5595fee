"""The reference itself: checked against independent float64 math and by gradcheck."""

import pytest
import torch
from helpers import make_inputs, rel_error

from fastlora import reference


@pytest.mark.parametrize("lead", [(7,), (2, 3), (1,), (0,)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_elementwise_float64_math(lead, bias):
    x, w, b, A, B = make_inputs(lead, 13, 11, 4, torch.float64, bias=bias)
    s = 0.75
    out = reference.lora_linear(x, w, b, A, B, s)
    # Independent formulation: explicit sums over the in-features and rank indices.
    expected = torch.einsum("...k,nk->...n", x, w) + s * torch.einsum("...k,rk,nr->...n", x, A, B)
    if b is not None:
        expected = expected + b
    assert out.shape == (*lead, 11)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    inputs = make_inputs((2, 3), 6, 5, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: reference.lora_linear(*t, 1.5), inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_fp32_adapters_run_the_branch_in_fp32(dtype):
    x, w, b, A, B = make_inputs(9, 16, 8, 4, dtype, adapter_dtype=torch.float32)
    out = reference.lora_linear(x, w, b, A, B, 2.0)
    assert out.dtype == dtype
    x64, w64, b64, A64, B64 = (t.double() for t in (x, w, b, A, B))
    assert rel_error(out, reference.lora_linear(x64, w64, b64, A64, B64, 2.0)) < 1e-2
