"""QLoRA: the fused layer over a bitsandbytes 4-bit base, against bitsandbytes' own dequantization
followed by the float64 reference (``fastlora.reference``)."""

import copy
import math
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import rel_error, tolerance, train_losses
from torch.utils._python_dispatch import TorchDispatchMode

bnb = pytest.importorskip("bitsandbytes")
triton_qlora = pytest.importorskip("fastlora.ops.triton_qlora")
from fastlora.ops import _triton_common  # noqa: E402

import fastlora  # noqa: E402
from fastlora import FusedLoRALinear, patch_peft, qlora  # noqa: E402

BACKEND = "triton" if fastlora.available_backends()["triton"].available else "torch"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_qlora.INTERPRET, reason="the 4-bit kernels need CUDA or TRITON_INTERPRET=1"
)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the QLoRA kernels write starts as NaN, so an element left unwritten fails."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_triton_common, "_empty", nan_empty)


def quantized(in_features, out_features, dtype, quant_type="nf4", blocksize=64, nested=True, bias=True):
    """A fresh random bitsandbytes ``Linear4bit`` computing in ``dtype`` and its W as bitsandbytes
    dequantizes it (float64)."""
    linear = torch.nn.Linear(in_features, out_features, bias=bias, device=DEVICE, dtype=dtype)
    layer = qlora.quantize_linear(linear, quant_type, blocksize, nested, compute_dtype=dtype)
    layer.support_avx512bf16_for_cpu = False  # else bitsandbytes repacks W in place for its CPU kernel
    return layer, bnb_dequantize(layer.weight).to(dtype).double()


def bnb_dequantize(weight):
    """W as bitsandbytes dequantizes it. On the CPU, with its default (device-independent, CUDA-
    equivalent) implementation: 0.50.2's CPU C kernel indexes absmax by row and is wrong where quant
    blocks straddle rows (0.2 absolute error at K = 96, blocksize 64, against its own quantize_4bit)."""
    state = weight.quant_state
    if weight.device.type == "cuda":
        return bnb.functional.dequantize_4bit(weight.data, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    code = bnb.functional.get_4bit_type(state.quant_type, device="cpu")
    eager = _dequantize_4bit_compute.__wrapped__  # bitsandbytes wraps it in torch.compile
    packed = weight.data.view(torch.uint8).reshape(-1)
    return eager(packed, absmax.float(), code, state.blocksize, state.shape, state.dtype)


def adapters(in_features, out_features, r, dtype):
    A = (torch.randn(r, in_features, device=DEVICE) / in_features**0.5).to(dtype).requires_grad_()
    B = (torch.randn(out_features, r, device=DEVICE) / r**0.5).to(dtype).requires_grad_()
    return A, B


def fused(layer, x, bias, A, B, scaling, dropout=0.0, backend=BACKEND):
    return qlora.base_weight(layer.weight, layer.compute_dtype).lora_linear(x, bias, A, B, scaling, dropout, backend)


def check(layer, W64, x, bias, A, B, scaling, tol):
    """Forward and the gradients of x, bias, A, B against the float64 reference over bitsandbytes' W."""
    out = fused(layer, x, bias, A, B, scaling)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], W64.shape[0])
    inputs = [t for t in (x, bias, A, B) if t is not None]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    x64, *rest = inputs64
    bias64 = rest.pop(0) if bias is not None else None
    ref = fastlora.reference.lora_linear(x64, W64, bias64, *rest, scaling)
    assert rel_error(out, ref) <= tol, f"forward: {rel_error(out, ref):.2e}"
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, gy)
    grads64 = torch.autograd.grad(ref, inputs64, gy.double())
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.dtype == inputs[i].dtype
        assert rel_error(g, g64) <= tol, f"grad {i}: {rel_error(g, g64):.2e}"


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


def test_packed_storage_in_another_dtype():
    """FSDP-QLoRA stores the packed bytes as bf16 (quant_storage): the same bytes, read as uint8."""
    linear = torch.nn.Linear(64, 40, device=DEVICE, dtype=torch.bfloat16)
    layer = qlora.quantize_linear(linear, quant_storage=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and qlora.unsupported_reason(layer.weight) is None
    module = FusedLoRALinear.from_linear(layer, r=4, alpha=8)
    with torch.no_grad():
        module.lora_B.normal_()
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16)
    W = bnb_dequantize(layer.weight).to(torch.bfloat16).double()
    ref = fastlora.reference.lora_linear(x.double(), W, layer.bias.double(), module.lora_A.double(), module.lora_B.double(), 2.0)
    assert rel_error(module(x), ref) <= 1e-2


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


def test_from_linear_keeps_the_4bit_weight():
    layer, W64 = quantized(64, 32, torch.bfloat16, "fp4", 128, False)
    module = FusedLoRALinear.from_linear(layer, r=8, alpha=16)
    assert module.lora_A.dtype == torch.bfloat16 and module.compute_dtype == torch.bfloat16
    assert module.bias is layer.bias and not module.weight.requires_grad
    with torch.no_grad():
        module.lora_B.normal_()
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.bfloat16)
    ref = fastlora.reference.lora_linear(x.double(), W64, layer.bias.double(), module.lora_A.double(), module.lora_B.double(), 2.0)
    assert rel_error(module(x), ref) <= 1e-2
    assert "4-bit fp4" in repr(module)
    with pytest.raises(NotImplementedError, match="4-bit"):
        module.merge()


def test_bad_inputs_raise():
    layer, _ = quantized(64, 32, torch.bfloat16)
    A, B = adapters(64, 32, 4, torch.float32)
    with pytest.raises(ValueError, match="in_features = 64"):
        fused(layer, torch.randn(2, 63, device=DEVICE, dtype=torch.bfloat16), None, A, B, 1.0)
    with pytest.raises(TypeError, match="compute dtype torch.bfloat16; got x in torch.float16"):
        fused(layer, torch.randn(2, 64, device=DEVICE, dtype=torch.float16), None, A, B, 1.0)
    # "auto" takes what the kernels do not (another dtype) to the dequantizing path, as bitsandbytes would
    x32 = torch.randn(2, 64, device=DEVICE)
    expected = fastlora.reference.lora_linear(x32.double(), bnb_dequantize(layer.weight).float().double(), None, A.double(), B.double(), 1.0)
    assert rel_error(fused(layer, x32, None, A, B, 1.0, backend="auto"), expected) <= 1e-5
    with pytest.raises(ValueError, match="adapters"):
        fused(layer, torch.randn(2, 64, device=DEVICE, dtype=torch.bfloat16), None, B, A, 1.0)
    with pytest.raises(ValueError, match="'auto', 'triton' or 'torch'"):
        fused(layer, torch.randn(2, 64, device=DEVICE, dtype=torch.bfloat16), None, A, B, 1.0, backend="cuda")


def test_unsupported_states_are_named():
    layer, _ = quantized(64, 32, torch.bfloat16)
    state = layer.weight.quant_state
    state.blocksize = 48
    assert "blocksize 48" in qlora.unsupported_reason(layer.weight)
    state.blocksize, state.quant_type = 64, "int4"
    with pytest.raises(qlora.Unsupported4bitState, match="quant_type 'int4'"):
        FusedLoRALinear.from_linear(layer)
    state.quant_type, state.packing_format_for_cpu = "nf4", True
    assert "packing_format_for_cpu" in qlora.unsupported_reason(layer.weight)


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"fastlora\[qlora\]"):
        qlora.quantize_linear(torch.nn.Linear(8, 8))


def test_import_fastlora_does_not_import_bitsandbytes():
    code = "import sys, fastlora, fastlora.qlora; assert 'bitsandbytes' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


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


def test_compiled_4bit_module_has_no_graph_breaks():
    torch._dynamo.reset()
    layer, _ = quantized(64, 48, torch.bfloat16)
    module = FusedLoRALinear.from_linear(layer, r=4, alpha=8, adapter_dtype=torch.float32)
    with torch.no_grad():
        module.lora_B.normal_()
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, module(x))
    compiled.sum().backward()
    assert module.lora_A.grad is not None and x.grad is not None


def test_launch_for_inspection_runs_the_launchers(monkeypatch):
    launches = []
    matmul, low_rank = triton_qlora._launch_matmul, triton_qlora._launch_low_rank
    monkeypatch.setattr(triton_qlora, "_launch_matmul", lambda *a, **k: launches.append(a[3]) or matmul(*a, **k))
    monkeypatch.setattr(triton_qlora, "_launch_low_rank", lambda *a: launches.append("xa") or low_rank(*a))
    triton_qlora.launch_for_inspection(8, 64, 40, 4, torch.bfloat16, torch.float32, 0.1, backward=True)
    assert launches == ["xa", True, False]  # D(x)Aᵀ, the forward (Wᵀ) and grad_x (W)


@pytest.mark.parametrize("limits", [(9, 0), (8, 0)])
def test_pruning_keeps_configs_that_fit(limits):
    from fastlora.ops._device import KNOWN_LIMITS, target_limits

    for adapter_dtype in (torch.bfloat16, torch.float32):
        args = {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "la_ptr": torch.empty(1, dtype=adapter_dtype)}
        for r_pad in (16, 64, 128, 256):
            for m_bucket in (1, 64, 8192):
                with target_limits(KNOWN_LIMITS[limits]) as target:
                    kept = triton_qlora.prune_configs(triton_qlora.GPU_CONFIGS, {**args, "M_BUCKET": m_bucket}, R_PAD=r_pad)
                assert kept
                for c in kept:
                    assert triton_qlora._shared_bytes(c, 2, adapter_dtype.itemsize, r_pad) <= target.max_shared_bytes
                    assert c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + r_pad) / (32 * c.num_warps) <= 72
                    assert limits == (9, 0) or triton_qlora._shape(c) not in triton_qlora._HOPPER_ONLY


# A tiny PEFT causal LM over 4-bit linears, quantized here on the CPU (no hub download).
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_4bit_llama(dtype, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype)
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child in LLAMA_TARGETS:
            layer = qlora.quantize_linear(module, "nf4", 64, True, compute_dtype=dtype)
            layer.support_avx512bf16_for_cpu = False  # bitsandbytes would repack W for its CPU kernel
            setattr(model.get_submodule(parent), child, layer)
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps lora.bnb.Linear4bit
    return model


def tiny_4bit_peft(dtype, **lora_kwargs):
    model = peft.get_peft_model(tiny_4bit_llama(dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, **lora_kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def token_ids(seed=2):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def fused_calls(monkeypatch):
    calls, original = [], triton_qlora.qlora_linear_2d

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(triton_qlora, "qlora_linear_2d", spy)
    return calls


def packed_storage(model):
    return [(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes(), p.dtype) for n, p in model.named_parameters() if "base_layer.weight" in n]


def test_peft_4bit_llama_patched_matches_peft(fused_calls):
    model, ids = tiny_4bit_peft(torch.float16), token_ids()
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    storage = packed_storage(model)
    ref_logits, ref_grads = logits_and_grads(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch_peft(model) == 14
    logits, grads = logits_and_grads(model, ids)
    assert len(fused_calls) == 14
    assert rel_error(logits, ref_logits) <= 1e-2
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_error(grads[name], ref_grads[name]) <= 1e-2, name
    assert packed_storage(model) == storage and all(dtype == torch.uint8 for *_, dtype in storage)


def dequantized_fp32_copy(model):
    """The same PEFT model in float32 with each 4-bit base replaced by its dequantized nn.Linear."""
    truth = copy.deepcopy(model)
    for module in list(truth.modules()):
        if isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit):
            base = module.base_layer
            linear = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=DEVICE)
            with torch.no_grad():
                linear.weight.copy_(bnb_dequantize(base.weight).float())
                if base.bias is not None:
                    linear.bias.copy_(base.bias.float())
            module.base_layer = linear.requires_grad_(False)
    return truth.float()


def test_peft_4bit_bf16_as_accurate_as_peft(fused_calls):
    """Two bf16 runs of a whole model differ by ~1e-2 from rounding alone: both are measured against
    the float32 run of the same dequantized weights, and fastlora must be about as accurate as PEFT."""
    model, ids = tiny_4bit_peft(torch.bfloat16), token_ids()
    truth = logits_and_grads(dequantized_fp32_copy(model), ids)
    peft_run = logits_and_grads(model, ids)
    patch_peft(model)
    fused_run = logits_and_grads(model, ids)
    assert fused_calls

    def errors(run):
        flat = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in (run[1], truth[1])]
        return rel_error(run[0], truth[0]), rel_error(*flat)

    for fused_err, peft_err in zip(errors(fused_run), errors(peft_run)):
        assert fused_err <= 1.5 * peft_err + 2e-3


def test_peft_4bit_training_and_save_load(tmp_path):
    reference = tiny_4bit_peft(torch.float16)
    fused = copy.deepcopy(reference)
    patch_peft(fused)
    storage = packed_storage(fused)
    losses = []
    for model in (reference, fused):
        ids = token_ids(seed=5)
        losses.append(train_losses(model, [ids] * 4))  # one batch: the loss must fall
    assert losses[0][-1] < losses[0][0]  # it trained
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=0)
    assert packed_storage(fused) == storage

    ids = token_ids(seed=9)
    expected = fused(input_ids=ids).logits
    fused.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_4bit_llama(torch.float16), tmp_path)
    assert patch_peft(loaded) == 14
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-3, atol=1e-3)


def test_patch_peft_leaves_unreadable_4bit_states_on_peft(fused_calls):
    model, ids = tiny_4bit_peft(torch.float16), token_ids()
    model.eval()
    expected = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="the cuda backend has no 4-bit kernels"):
        assert patch_peft(model, backend="cuda") == 0
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj
    state = q_proj.base_layer.weight.quant_state
    state.code = state.code.flip(0)  # a table fastlora does not decode (bitsandbytes' dequant ignores it)
    with pytest.warns(UserWarning) as record:
        assert patch_peft(model) == 13
    message = str(record[0].message)
    assert "layers.1.self_attn.q_proj" in message and "code table" in message
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-2, atol=1e-2)
    assert len(fused_calls) == 13


def test_bench_providers_build_and_match_on_dequantized_w(capsys):
    """The 4-bit bench providers (timed on CUDA only) compute the reference over W's dequantization."""
    from fastlora.__main__ import main
    from fastlora.bench.cases import Case, make_inputs, parse_shapes
    from fastlora.bench.providers import PROVIDERS, dequantized_4bit
    from fastlora.bench.workload import reference_results

    case = Case("backward", 24, parse_shapes("64x96")[0], 4, "fp16", DEVICE)
    inp = make_inputs(case)
    expected = reference_results(dequantized_4bit(inp), "backward", True)
    assert rel_error(dequantized_4bit(inp).weight, inp.weight) > 0.02  # the 4-bit W differs from W
    for name in ("peft-qlora", "fastlora-qlora"):
        layer = PROVIDERS[name].build(inp)
        x = inp.x.detach().requires_grad_()
        y = layer.forward(x)
        y.backward(inp.dy)
        assert rel_error(y, expected["y"]) <= 1e-2, name
        for key, got in (("grad_x", x.grad), ("grad_lora_A", layer.lora_A.grad), ("grad_lora_B", layer.lora_B.grad)):
            assert rel_error(got, expected[key]) <= 1e-2, (name, key)
    if DEVICE == "cpu":
        argv = ["bench", "--device", "cpu", "--shapes", "48x64x32", "--ranks", "4", "--modes", "forward"]
        assert main(argv + ["--providers", "base,peft-qlora,fastlora-qlora"]) == 0
        assert "CUDA only" in capsys.readouterr().out
