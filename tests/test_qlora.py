"""QLoRA kernel numerics: the fused layer over a bitsandbytes 4-bit base against bitsandbytes' own
dequantization followed by the float64 reference (``fastlora.reference``), its dropout, the ops'
contract and compile, the configs and the module layout. The PEFT and bitsandbytes integration is
in ``test_qlora_integration.py``."""

import math
import subprocess
import sys

import pytest
import torch
from helpers import poisoned, rel_error, tolerance  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

bnb = pytest.importorskip("bitsandbytes")
triton_qlora = pytest.importorskip("fastlora.ops.triton_qlora")
from fastlora.ops import _qlora_configs  # noqa: E402
from qlora_helpers import DEVICE, adapters, check, fused, quantized  # noqa: E402

from fastlora import FusedLoRALinear, qlora  # noqa: E402

pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not triton_qlora.INTERPRET, reason="the 4-bit kernels need CUDA or TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("poisoned"),  # every buffer the kernels write starts as NaN
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "quant_type, blocksize, nested", [("nf4", 64, True), ("nf4", 128, False), ("fp4", 64, False), ("fp4", 128, True)]
)
@pytest.mark.parametrize(
    "lead, K, N, r, adapter_dtype",
    [
        ((5, 7), 200, 72, 8, torch.float32),  # K not a multiple of any block: blocks cross rows
        (33, 37, 29, 1, None),  # N·K odd: the last byte holds one code
        (1, 128, 96, 16, torch.float32),
        (17, 64, 48, 256, None),
    ],
    ids=["lead-odd-K", "odd-NK-r1", "M1", "r256"],
)
def test_matches_reference(dtype, quant_type, blocksize, nested, lead, K, N, r, adapter_dtype):
    layer, W64 = quantized(K, N, dtype, quant_type, blocksize, nested)
    lead = (lead,) if isinstance(lead, int) else lead
    x = torch.randn(*lead, K, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = layer.bias.detach().clone().requires_grad_()
    A, B = adapters(K, N, r, adapter_dtype or dtype)
    check(layer, W64, x, bias, A, B, 1.5, tolerance(dtype, DEVICE))


def test_no_bias_noncontiguous_x_and_empty_batch():
    layer, W64 = quantized(96, 40, torch.bfloat16, bias=False)
    A, B = adapters(96, 40, 4, torch.float32)
    x = torch.randn(9, 192, device=DEVICE, dtype=torch.bfloat16)[:, ::2].requires_grad_()
    check(layer, W64, x, None, A, B, 0.5, 1e-2)
    empty = torch.randn(0, 96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out = fused(layer, empty, None, A, B, 0.5)
    assert out.shape == (0, 40)
    out.sum().backward()
    assert A.grad.abs().sum() >= 0 and empty.grad.shape == empty.shape


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False)])
def test_in_tile_dequantization_is_bitsandbytes(quant_type, nested):
    """With x = I and no adapter term, y = Wᵀ: every element the kernel dequantizes must be the value
    bitsandbytes' ``dequantize_4bit`` gives, to the bit."""
    K, N = 100, 36  # N·K = 3600: blocks of 64 straddle rows
    layer, W64 = quantized(K, N, torch.float16, quant_type, 64, nested, bias=False)
    A, B = torch.zeros(1, K, device=DEVICE, dtype=torch.float16), torch.zeros(N, 1, device=DEVICE, dtype=torch.float16)
    eye = torch.eye(K, device=DEVICE, dtype=torch.float16)
    out = fused(layer, eye, None, A, B, 1.0)
    torch.testing.assert_close(out.double(), W64.t(), rtol=0, atol=0)

def test_code_tables_are_bitsandbytes():
    for quant_type in ("nf4", "fp4"):
        theirs = bnb.functional.get_4bit_type(quant_type, device="cpu")
        assert torch.equal(qlora.code_table(quant_type, "cpu"), theirs.float())


def recover_mask(m, k, p, seed):
    """The keep mask a call on an x [m, k] draws after manual_seed(seed): W = 0, A = B = I, so
    y = scaling·D(x)."""
    layer, _ = quantized(k, k, torch.float16, bias=False)
    layer.weight.data.zero_()  # every code 0: NF4 code 0 is -1, so zero the scales too
    layer.weight.quant_state.offset.zero_()
    layer.weight.quant_state.state2.absmax.zero_()
    x = torch.rand(m, k, device=DEVICE).add_(0.5).half()
    eye = torch.eye(k, device=DEVICE)
    torch.manual_seed(seed)
    out = fused(layer, x, None, eye, eye, 1.0, dropout=p)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=2e-3, atol=0)
    return kept.double()


def test_dropout_matches_the_formula_with_the_same_mask():
    m, k, n, r, p, seed, scaling = 21, 40, 24, 3, 0.3, 99, 2.0
    keep = recover_mask(m, k, p, seed)
    assert 0.5 < keep.mean() < 0.9
    layer, W64 = quantized(k, n, torch.float16)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16, requires_grad=True)
    A, B = adapters(k, n, r, torch.float32)
    torch.manual_seed(seed)
    out = fused(layer, x, layer.bias, A, B, scaling, dropout=p)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    ref = x64 @ W64.t() + layer.bias.double() + scaling * ((x64 * keep / (1 - p)) @ A64.t()) @ B64.t()
    assert rel_error(out, ref) <= 1e-2
    gy = torch.randn_like(out)
    for g, g64 in zip(torch.autograd.grad(out, (x, A, B), gy), torch.autograd.grad(ref, (x64, A64, B64), gy.double())):
        assert rel_error(g, g64) <= 1e-2


@pytest.mark.skipif(not triton_qlora.INTERPRET, reason="counts the interpreter's tl.rand calls (compiled kernels cannot be spied on)")
def test_dropout_draws_each_mask_once(monkeypatch):
    """The forward draws one random number an element of x (padded to the interpreter's 64×64
    tiles), however many column tiles N spans; the backward one an element of grad_x and one an
    element of x in grad_A's reduction. Drawn in the GEMM's K loop, the forward drew N/64 times as
    many (here 5×)."""
    import triton.language as tl

    M, K, N = 40, 100, 300  # N: five 64-wide column tiles
    draws, rand = [], tl.rand

    def counted(seed, offset, *args, **kwargs):
        draws.append(math.prod(int(d) for d in offset.shape))
        return rand(seed, offset, *args, **kwargs)

    layer, _ = quantized(K, N, torch.float16)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.float16, requires_grad=True)
    A, B = adapters(K, N, 4, torch.float32)
    monkeypatch.setattr(tl, "rand", counted)
    out = fused(layer, x, None, A, B, 2.0, dropout=0.2)
    assert sum(draws) == 64 * 128  # x's 40×100 elements in 64×64 tiles: one draw each
    draws.clear()
    out.backward(torch.randn_like(out))
    grad_A_tile = 128  # _reduce_over_m's tile of K at r = 4, 64-row steps: 40×100 in 64×128
    assert sum(draws) == 64 * 128 + 64 * grad_A_tile


class FloatCopies(TorchDispatchMode):
    """Records the shape of every floating-point tensor an op creates with at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.numel:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_weight_is_never_dequantized_to_a_float_copy():
    """No op of the forward or backward creates a float tensor as large as W; the same tracker
    catches the dequantizing torch path, so it can fail."""
    K, N, M = 256, 192, 4
    layer, _ = quantized(K, N, torch.bfloat16)
    module = FusedLoRALinear.from_linear(layer, r=4, alpha=8, adapter_dtype=torch.float32)
    assert module.weight is layer.weight and module.weight.dtype == torch.uint8
    storage = (module.weight.untyped_storage().data_ptr(), module.weight.untyped_storage().nbytes())
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    for backend, expect_copy in ((module.backend, False), ("torch", True)):
        module.backend = backend
        with FloatCopies(N * K) as tracker:
            module(x).sum().backward()
        assert bool(tracker.seen) == expect_copy, tracker.seen
    assert (module.weight.untyped_storage().data_ptr(), module.weight.untyped_storage().nbytes()) == storage
    assert module.weight.numel() == N * K // 2

def test_the_4bit_format_and_kernels_import_in_one_direction():
    """fastlora.qlora → ops._quant4bit ← ops.triton_qlora: the kernels read the format, never the
    layers' module (blocked here: any import of it raises); the format imports no kernels."""
    kernels = "import sys, fastlora; sys.modules['fastlora.qlora'] = None; import fastlora.ops.triton_qlora"
    fmt = (
        "import sys, fastlora.ops._quant4bit; "
        "assert not {'triton', 'fastlora.ops.triton_qlora'} & set(sys.modules), 'the format imported kernels'"
    )
    for code in (kernels, fmt):
        subprocess.run([sys.executable, "-c", code], check=True)


def op_args(M=5, K=64, N=48, r=4, dtype=torch.float16, requires_grad=True):
    layer, _ = quantized(K, N, dtype)
    quant = qlora.base_weight(layer.weight, dtype).quant()
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    A, B = adapters(K, N, r, torch.float32)
    bias = layer.bias.detach().clone().requires_grad_(requires_grad)
    return (x, *quant, bias, A, B, 2.0, 0.0, None)


def test_opcheck():
    args = op_args()
    torch.library.opcheck(triton_qlora.forward_op, args)
    y, xa = triton_qlora.forward_op(*args)
    x, quant, (A, B) = args[0], args[1:10], args[11:13]
    gy = torch.randn_like(y)
    bwd = (gy, x.detach(), xa, *quant, A.detach(), B.detach(), 2.0, 0.0, None, True, True, True, True)
    torch.library.opcheck(triton_qlora.backward_op, bwd, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    args = op_args()
    x, quant, bias, A, B = args[0], triton_qlora.Quant4bit(*args[1:10]), args[10], args[11], args[12]

    def step(x, bias, A, B):
        return triton_qlora.qlora_linear_2d(x, quant, bias, A, B, 2.0, 0.0, None)

    eager = step(x, bias, A, B)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, bias, A, B)
    torch.testing.assert_close(compiled, eager)
    gy = torch.randn_like(eager)
    for g, h in zip(torch.autograd.grad(compiled, (x, bias, A, B), gy), torch.autograd.grad(eager, (x, bias, A, B), gy)):
        torch.testing.assert_close(g, h)

def test_launch_for_inspection_runs_the_launchers(monkeypatch):
    launches = []
    matmul, low_rank = triton_qlora._launch_matmul, triton_qlora._launch_low_rank
    monkeypatch.setattr(triton_qlora, "_launch_matmul", lambda *a, **k: launches.append(a[3]) or matmul(*a, **k))
    monkeypatch.setattr(triton_qlora, "_launch_low_rank", lambda *a: launches.append("xa") or low_rank(*a))
    triton_qlora.launch_for_inspection(8, 64, 40, 4, torch.bfloat16, torch.float32, 0.1, backward=True)
    assert launches == ["xa", True, False]  # D(x)Aᵀ, the forward (Wᵀ) and grad_x (W)


@pytest.fixture
def formula_only(monkeypatch):
    """The pruning tests check the formula filters; the compiler's (``drop_spilling``) needs every
    argument of a launch and is checked by ``fastlora inspect`` (tests/test_inspect.py)."""
    monkeypatch.setattr(_qlora_configs, "drop_spilling", lambda kernel, configs, named_args, **kwargs: list(configs))


@pytest.mark.usefixtures("formula_only")
@pytest.mark.parametrize("limits", [(9, 0), (8, 0), (10, 0), (12, 0)])
def test_pruning_keeps_configs_that_fit(limits):
    from fastlora.ops._device import KNOWN_LIMITS, arch_rules, target_limits

    configs = _qlora_configs
    for adapter_dtype in (torch.bfloat16, torch.float32):
        args = {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "la_ptr": torch.empty(1, dtype=adapter_dtype)}
        for r_pad in (16, 64, 128, 256):
            for m_bucket in (1, 64, 8192):
                with target_limits(KNOWN_LIMITS[limits]) as target:
                    kept = configs.prune_configs(configs.GPU_CONFIGS, {**args, "M_BUCKET": m_bucket}, R_PAD=r_pad)
                assert kept
                # sm_120's 99 KiB is under the bound of every config at r = 256 (124-156 KiB, most of
                # it the epilogue's fp32 Bᵀ tile): the leanest is kept, 32×64×32/8 warps, whose compile
                # for sm_120 takes 33 KiB (bf16 adapters) and 65 KiB (fp32), forward and grad_x.
                over_the_bound = limits == (12, 0) and r_pad == 256
                assert not over_the_bound or [configs._shape(c) for c in kept] == [(32, 64, 32, 8)]
                for c in kept:
                    bound = configs._shared_bytes(c, 2, adapter_dtype.itemsize, r_pad)
                    assert over_the_bound or bound <= target.max_shared_bytes
                    assert c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + r_pad) / (32 * c.num_warps) <= 72
                    # The two shapes that spilled with mma.sync (sm_80) only where the dots are wgmma/tcgen05.
                    wide_mma = arch_rules(limits).mma in ("wgmma", "tcgen05")
                    assert wide_mma or configs._shape(c) not in configs._WIDE_MMA_ONLY


@pytest.mark.usefixtures("formula_only")
@pytest.mark.parametrize("limits", [(9, 0), (8, 0)])
def test_low_rank_pass_pruning_keeps_configs_that_fit(limits):
    """Every rank has a config of the dropout pass within the budgets, and small M gets short rows."""
    from fastlora.ops._device import KNOWN_LIMITS, target_limits

    configs = _qlora_configs
    for adapter_dtype in (torch.bfloat16, torch.float32):
        args = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "la_ptr": torch.empty(1, dtype=adapter_dtype)}
        for r_pad in (16, 64, 128, 256):
            for m_bucket in (1, 64, 8192):
                with target_limits(KNOWN_LIMITS[limits]) as target:
                    kept = configs.prune_low_rank_configs(configs.LOW_RANK_GPU_CONFIGS, {**args, "M_BUCKET": m_bucket}, R_PAD=r_pad)
                assert kept
                for c in kept:
                    bm, bk, threads = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], 32 * c.num_warps
                    assert configs._low_rank_shared_bytes(c, 2, adapter_dtype.itemsize, r_pad) <= target.max_shared_bytes
                    assert (bm + bk) * r_pad / threads <= 72 and bm * bk / threads <= 32
                    assert len(kept) == 1 or bm <= max(16, m_bucket)
                if m_bucket == 1:
                    assert min(c.kwargs["BLOCK_M"] for c in kept) == (16 if r_pad <= 64 else 32)
