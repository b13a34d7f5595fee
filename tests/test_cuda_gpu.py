"""The ``"cuda"`` backend on a GPU (skipped with the backend's reason elsewhere): forward and every
gradient against the float64 reference on odd shapes, every dtype pairing, strided inputs and
M = 0, with the caching allocator poisoned with NaN first so that an unwritten output fails; a
gradient broadcast over rows; the ``need_*`` flags.

The backend-parametrised files run "cuda" too: tests/test_lora_ops.py (opcheck among them),
tests/test_dropout.py, tests/test_determinism.py (bit-identical reruns) and tests/test_resources.py
(more than 2³¹ elements, CUDA graphs).
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_against_reference, make_inputs, rel_error

import fastlora
from fastlora.ops.registry import backend_ops

_CUDA_STATUS = fastlora.available_backends()["cuda"]
CUDA_REASON = None if _CUDA_STATUS.available else _CUDA_STATUS.detail
requires_cuda_backend = pytest.mark.skipif(CUDA_REASON is not None, reason=f"backend='cuda' unavailable: {CUDA_REASON}")
pytestmark = pytest.mark.gpu
HALVES = [torch.float16, torch.bfloat16]
DTYPE_PAIRS = [(torch.float32, torch.float32), *((d, a) for d in HALVES for a in (d, torch.float32))]


@pytest.fixture
def nan_cache():
    """Leave NaN-filled blocks in both pools of the caching allocator, where outputs get allocated."""
    torch.cuda.empty_cache()
    blocks = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(16)]  # small pool
    blocks += [torch.full((1 << 24,), float("nan"), device="cuda") for _ in range(4)]  # large pool
    del blocks
    yield


SCALING = 2.0
SHAPES_KN = [(16, 24), (70, 45), (4096, 45), (16, 4096), (70, 4096)]


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("r", [1, 5, 16, 64, 256])
@pytest.mark.parametrize("k, n", SHAPES_KN, ids=[f"k{k}-n{n}" for k, n in SHAPES_KN])
@pytest.mark.parametrize("m", [0, 1, 37, 1000])
def test_odd_shapes_bf16(m, k, n, r):
    check_against_reference(make_inputs(m, k, n, r, torch.bfloat16, "cuda"), SCALING, "cuda")


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("x_noncontiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype, adapter_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("shape", [(37, 70, 45, 5), (1000, 4096, 4096, 16)], ids=str)
def test_dtypes_bias_and_strides(shape, dtype, adapter_dtype, bias, x_noncontiguous):
    m, k, n, r = shape
    inputs = make_inputs(
        m, k, n, r, dtype, "cuda", bias=bias, adapter_dtype=adapter_dtype, x_noncontiguous=x_noncontiguous
    )
    check_against_reference(inputs, SCALING, "cuda")


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("conv1d_weight", [False, True], ids=["row-major-W", "transposed-W"])
@pytest.mark.parametrize("dtype, adapter_dtype", [(d, a) for d, a in DTYPE_PAIRS if d != torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1000, 512, 384, 5), (257, 4096, 1024, 16), (64, 64, 64, 256), (1, 8, 8, 1)], ids=str)
def test_cutlass_paths_both_weight_layouts(shape, dtype, adapter_dtype, conv1d_weight):
    # Shapes on the 16-byte vector contract, so the CUTLASS kernels run (sm90 on an H100, sm80 on
    # other Ampere-or-newer parts): partial tiles, r not a multiple of 8, r = 256 (several LoRA K-blocks).
    m, k, n, r = shape
    x, w, b, A, B = make_inputs(m, k, n, r, dtype, "cuda", adapter_dtype=adapter_dtype)
    if conv1d_weight:  # GPT-2's Conv1D hands over weight.t(): [N, K] with strides (1, N)
        w = w.t().contiguous().t()
    check_against_reference((x, w, b, A, B), SCALING, "cuda")


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=str)
def test_fp16_cutlass_path_keeps_a_low_rank_product_beyond_fp16(adapter_dtype):
    # s·xa ~ 1e6 (beyond fp16's 65504) times a small B: a low-rank term of ~1e3. On the shapes of the
    # CUTLASS paths its fp16 K-block operands are scaled per column by powers of two (lora_blocks).
    g = torch.Generator(device="cuda").manual_seed(11)
    m, k, n, r = 256, 64, 128, 4
    x = (torch.randn(m, k, device="cuda", generator=g) * 30).half()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).half()
    A = (torch.randn(r, k, device="cuda", generator=g) * 3000).to(adapter_dtype)
    B = (torch.randn(n, r, device="cuda", generator=g) * 2e-4).to(adapter_dtype)
    y, xa = backend_ops("cuda").forward(x, w, None, A, B, 1.5, 0.0, None)
    assert xa.abs().max() > 1e5
    ref = fastlora.reference.lora_linear(x.double(), w.double(), None, A.double(), B.double(), 1.5)
    assert torch.isfinite(y).all() and rel_error(y, ref) <= 1e-2


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
def test_row_broadcast_gradient_is_read_in_place():
    # d(Σ_n v_n Σ_m y_mn)/dy is v expanded over rows (sum's backward): a gy with row stride 0, which
    # the kernels read in place.
    x, w, b, A, B = make_inputs(37, 70, 45, 5, torch.bfloat16, "cuda")
    v = torch.randn(45, device="cuda", dtype=torch.bfloat16)
    out = fastlora.lora_linear(x, w, b, A, B, SCALING, backend="cuda")
    grads = torch.autograd.grad(out.sum(0).mul(v).sum(), (x, A, B))
    args64 = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
    ref = fastlora.reference.lora_linear(*args64, SCALING).sum(0).mul(v.double()).sum()
    grads64 = torch.autograd.grad(ref, (args64[0], args64[3], args64[4]))
    for g, g64 in zip(grads, grads64):
        assert rel_error(g, g64) <= 1e-2


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("m", [0, 37])
@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False), (False, True, False, False), (False, False, True, True), (True, True, True, True)],
    ids=str,
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_backward_flags_match_the_torch_backend(m, needs, dropout_p):
    # With dropout the two backends draw different masks, so only the mask-free grads are compared.
    x, w, _, A, B = (t.detach() if t is not None else None for t in make_inputs(m, 70, 45, 5, torch.float32, "cuda"))
    seed = torch.tensor(1234) if dropout_p else None
    cuda, ref = backend_ops("cuda"), backend_ops("torch")
    y, xa = cuda.forward(x, w, None, A, B, SCALING, dropout_p, seed)
    assert y.shape == (m, 45) and xa.shape == (m, 5) and xa.dtype == torch.float32
    gy = torch.randn(m, 45, device="cuda")
    got = cuda.backward(gy, x, xa, w, A, B, SCALING, dropout_p, seed, *needs)
    want = ref.backward(gy, x, xa, w, A, B, SCALING, dropout_p, seed, *needs)
    comparable = (dropout_p == 0, dropout_p == 0, True, True)  # grad_B reads xa; grad_bias has no mask
    for name, g, g_ref, needed, same_mask in zip(("x", "A", "B", "bias"), got, want, needs, comparable):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        if not needed:
            assert g.numel() == 0, name
        elif same_mask:
            assert not g.isnan().any() and rel_error(g, g_ref) <= 1e-5, name
