"""Every backend runnable here against the float64 reference: outputs and every gradient.

On the CPU that is "torch" and "triton" (under the interpreter, so shapes stay small); on a GPU,
"torch", "triton" and "cuda" (when built) also on LLM-sized shapes.
"""

import pytest
import torch
from helpers import BACKEND_DEVICE, check_against_reference, make_inputs, poisoned  # noqa: F401

import fastlora
from fastlora.ops.registry import backend_ops

pytestmark = pytest.mark.usefixtures("poisoned")

HALVES = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32, *HALVES]
# Odd sizes: none a multiple of any block; M covers empty, single-row and multi-block inputs.
SHAPES = [  # M, K (in), N (out), r
    (0, 16, 24, 1),
    (1, 16, 24, 5),
    (37, 70, 45, 16),
    (37, 16, 45, 1),
    (130, 70, 24, 5),
]


def scaling_for(r: int) -> float:
    return 2.0 * 16 / r


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(backend, device, dtype, shape, bias):
    m, k, n, r = shape
    check_against_reference(make_inputs(m, k, n, r, dtype, device, bias=bias), scaling_for(r), backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("r", [1, 3, 16, 17, 64, 100, 256])
def test_every_rank(backend, device, r):
    check_against_reference(make_inputs(21, 40, 36, r, torch.float32, device), scaling_for(r), backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 5), (0, 7), (1, 1)], ids=str)
def test_leading_batch_dims(backend, device, lead):
    check_against_reference(make_inputs(lead, 24, 19, 4, torch.float32, device), 0.5, backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(backend, device, dtype):
    check_against_reference(make_inputs((3, 11), 33, 20, 6, dtype, device, x_noncontiguous=True), 1.0, backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_transposed_input(backend, device):
    x, w, b, A, B = make_inputs(29, 18, 22, 4, torch.float32, device)
    x_t = x.detach().t().contiguous().t().requires_grad_()  # column-major [M, K]
    check_against_reference((x_t, w, b, A, B), 1.25, backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_fp32_adapters_with_half_activations(backend, device, dtype):
    check_against_reference(make_inputs(41, 48, 30, 8, dtype, device, adapter_dtype=torch.float32), 2.0, backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_trainable_weight_gets_its_gradient(backend, device):
    check_against_reference(make_inputs(17, 20, 12, 3, torch.float32, device, weight_requires_grad=True), 1.0, backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("frozen", ["x", "lora_A", "lora_B", "bias"])
def test_partial_gradients(backend, device, frozen):
    inputs = make_inputs(23, 20, 14, 5, torch.float32, device)
    names = ["x", "weight", "bias", "lora_A", "lora_B"]
    inputs[names.index(frozen)].requires_grad_(False)
    check_against_reference(inputs, 1.0, backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=str)
def test_fp16_low_rank_product_beyond_fp16_range(backend, device, adapter_dtype):
    # x·Aᵀ reaches ~1.6e5 (fp16 saturates at 65504) while y stays in range because B is small:
    # correct only if x·Aᵀ is held in fp32. grad_B = s·gyᵀ·(x·Aᵀ) itself exceeds fp16's range, so
    # with fp16 adapters lora_B is frozen.
    x, w, b, A, B = make_inputs(16, 32, 24, 4, torch.float16, device, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        x.abs_().mul_(40)
        A.fill_(128.0)
        B.mul_(1e-4)
    B.requires_grad_(adapter_dtype == torch.float32)
    check_against_reference((x, w, b, A, B), 1.0, backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_nan_and_inf_propagate_like_the_reference(backend, device):
    x, w, b, A, B = make_inputs(5, 16, 8, 2, torch.float32, device)
    with torch.no_grad():
        x[1, 3] = float("nan")
        x[3, 0] = float("inf")
    out = fastlora.lora_linear(x, w, b, A, B, 1.0, backend=backend)
    ref = fastlora.reference.lora_linear(x, w, b, A, B, 1.0)
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ref.isfinite()
    assert torch.allclose(out[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grad_mode_off_gives_the_same_y_without_a_graph(backend, device, mode):
    # With grad mode off the call runs the backend's forward without the autograd Function
    # (LoRAOps.__call__): the same values as the Function computes, and nothing recorded.
    x, w, b, A, B = make_inputs(9, 16, 8, 2, torch.float32, device)
    expected = fastlora.lora_linear(x, w, b, A, B, 1.5, backend=backend)
    with getattr(torch, mode)():
        out = fastlora.lora_linear(x, w, b, A, B, 1.5, backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, expected.detach())


@pytest.mark.gpu  # LLM-sized shapes
@pytest.mark.parametrize("backend", [b for b, d in ((p.values) for p in BACKEND_DEVICE) if d == "cuda"])
@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4096, 4096, 16), (64, 4096, 1024, 8), (1000, 4096, 4096, 16), (4096, 4096, 14336, 64), (2048, 14336, 4096, 128)])
def test_llm_shapes_on_gpu(backend, dtype, shape):
    m, k, n, r = shape
    check_against_reference(make_inputs(m, k, n, r, dtype, "cuda"), scaling_for(r), backend)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(backend, device, dropout_p):
    """torch.library's own checks: schema, fake tensors, autograd registration, AOT dispatch."""
    ops = backend_ops(backend)
    x, w, b, A, B = make_inputs(9, 16, 12, 4, torch.float32, device)
    seed = torch.tensor(1234) if dropout_p else None
    detached = (x.detach(), w, b.detach(), A.detach(), B.detach(), 0.5, dropout_p, seed)
    torch.library.opcheck(ops.forward, detached)
    torch.library.opcheck(
        ops.forward, (x, w, b, A, B, 0.5, dropout_p, seed), test_utils=("test_schema", "test_autograd_registration")
    )
    gy = torch.randn(9, 12, device=device)
    xa = torch.randn(9, 4, device=device)
    args = (gy, x.detach(), xa, w, A.detach(), B.detach(), 0.5, dropout_p, seed, True, True, True, True)
    torch.library.opcheck(ops.backward, args)
