"""DoRA (``use_dora=True``): fastlora against PEFT's own ``DoraLinearLayer`` evaluated in float64.

Every case draws fresh random inputs, makes ``lora_B`` random and ``magnitude`` differ from the
norms (so that every term of ``y`` and every gradient matters) and measures the output and the
gradients of x, A, B and m against the same PEFT layer copied to float64, by the tolerance table.
"""

import copy
import warnings

import pytest
import torch
from helpers import backends_on, rel_error, tolerance, train_losses
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fastlora import FusedLoRALinear, dora, patch_peft  # noqa: E402
from fastlora.adapters import load_adapter, save_adapter  # noqa: E402
from fastlora.layers import replace_linear_with_lora  # noqa: E402

BACKENDS = backends_on("cpu")  # torch, and triton under the interpreter
DTYPES = [  # (base dtype, adapter dtype)
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters"),
]
CALLS = []  # one entry per call of fastlora.dora.dora_linear (the fused path was taken)


@pytest.fixture(autouse=True)
def dora_calls(monkeypatch):
    original = dora.dora_linear

    def spy(*args, **kwargs):
        CALLS.append(kwargs.get("dropout"))
        return original(*args, **kwargs)

    monkeypatch.setattr(dora, "dora_linear", spy)
    CALLS.clear()
    return CALLS


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize(model, seed):
    """Random lora_B; magnitude = ‖W + sBA‖ × U(0.5, 1.5), so that m/n differs from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if "magnitude" in name:
                p.mul_(torch.rand(p.shape, generator=g).to(p.dtype) + 0.5)


def peft_dora(K, N, r, dtype, adapter_dtype, *, bias=True, conv1d=False, dropout=0.0, seed=0):
    """A PEFT DoRA ``lora.Linear`` over a fresh ``nn.Linear`` (or GPT-2 ``Conv1D``, fan_in_fan_out)."""
    torch.manual_seed(seed)
    base = transformers.pytorch_utils.Conv1D(N, K) if conv1d else nn.Linear(K, N, bias=bias)
    if conv1d and not bias:
        base.bias = None
    config = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["0"], use_dora=True, lora_dropout=dropout, fan_in_fan_out=conv1d)
    model = peft.get_peft_model(nn.Sequential(base).to(dtype), config, autocast_adapter_dtype=adapter_dtype == torch.float32)
    layer = model.base_model.model[0]
    randomize(layer, seed + 1)
    assert layer.lora_A["default"].weight.dtype == adapter_dtype
    return layer


class FixedDropout(nn.Module):
    """x ⊙ d with a given dropout scale d: the float64 reference of fastlora's dropout mask."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def run(layer, x, gy, train):
    """Output and the gradients of x and of every trainable parameter (name → grad)."""
    layer.train(train)
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    grads = {}
    if train:
        y.backward(gy)
        grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
    return y.detach(), grads


def check_against(fused, truth, x, gy, train, tol):
    calls = len(CALLS)
    y, grads = run(fused, x, gy, train)
    assert len(CALLS) == calls + 1  # fastlora's DoRA ran, not PEFT's forward
    y_ref, grads_ref = run(truth, x.double(), gy.double(), train)
    assert y.dtype == x.dtype and rel_error(y, y_ref) <= tol
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None and rel_error(grads[name], grads_ref[name]) <= tol, name
    if train:
        assert {"x", "lora_magnitude_vector.default.weight", "lora_A.default.weight"} <= grads.keys()


def patched(layer, backend):
    fused = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch_peft(fused, backend=backend) == 1
    return fused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, adapter_dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_patched_dora_matches_peft_float64(backend, dtype, adapter_dtype, bias):
    """Output and grads of x, A, B, m, in train and eval, on an ordinary and an odd shape."""
    tol = tolerance(dtype, "cpu")
    for (M, K, N, r), seed in (((6, 32, 24, 4), 0), ((1, 37, 29, 3), 1)):
        layer = peft_dora(K, N, r, dtype, adapter_dtype, bias=bias, seed=seed)
        fused, truth = patched(layer, backend), copy.deepcopy(layer).double()
        x = torch.randn(M, K).to(dtype)
        gy = torch.randn(M, N).to(dtype)
        for train in (True, False):
            check_against(fused, truth, x, gy, train, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_dora_3d_input_and_conv1d(backend):
    """GPT-2's Conv1D (fan_in_fan_out: W is the transposed view) with a [batch, seq, in] input."""
    layer = peft_dora(24, 40, 4, torch.float32, torch.float32, conv1d=True, seed=3)
    fused, truth = patched(layer, backend), copy.deepcopy(layer).double()
    x, gy = torch.randn(2, 3, 24), torch.randn(2, 3, 40)
    check_against(fused, truth, x, gy, True, tolerance(torch.float32, "cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, adapter_dtype", [DTYPES[0], DTYPES[3]])
def test_dropout_in_training_matches_float64_with_the_same_mask(backend, dtype, adapter_dtype):
    """PEFT's training path (base = D(x) Wᵀ) with fastlora's mask, regenerated from the seed."""
    p = 0.3
    layer = peft_dora(32, 24, 4, dtype, adapter_dtype, dropout=p, seed=5)
    fused, truth = patched(layer, backend), copy.deepcopy(layer).double()
    x, gy = torch.randn(6, 32).to(dtype), torch.randn(6, 24).to(dtype)
    torch.manual_seed(11)
    y, grads = run(fused, x, gy, True)
    assert CALLS == [p]
    torch.manual_seed(11)
    seed = int(torch.randint(2**31 - 1, (), dtype=torch.int64))
    scale = dora.dropout_scale(x, p, seed).double()
    assert 0 < (scale == 0).sum() < scale.numel()  # the mask dropped some, not all
    truth.lora_dropout["default"] = FixedDropout(scale)
    y_ref, grads_ref = run(truth, x.double(), gy.double(), True)
    tol = tolerance(dtype, "cpu")
    assert rel_error(y, y_ref) <= tol
    for name in grads_ref:
        assert rel_error(grads[name], grads_ref[name]) <= tol, name
    # and it is not the no-dropout result
    truth.lora_dropout["default"] = nn.Identity()
    assert rel_error(y, run(truth, x.double(), gy.double(), True)[0]) > 10 * tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_layer_matches_peft(backend):
    """``FusedLoRALinear(use_dora=True)``: PEFT's initial magnitude, its outputs and grads, and merge."""
    layer = peft_dora(32, 24, 4, torch.float32, torch.float32, seed=7)
    linear = nn.Linear(32, 24)
    linear.load_state_dict({"weight": layer.base_layer.weight, "bias": layer.base_layer.bias})
    fused = FusedLoRALinear.from_linear(linear, r=4, alpha=9, use_dora=True, backend=backend)
    assert fused.weight is linear.weight and fused.magnitude.requires_grad
    torch.testing.assert_close(fused.magnitude, linear.weight.detach().norm(dim=1), rtol=1e-6, atol=0)
    with torch.no_grad():
        fused.lora_A.copy_(layer.lora_A["default"].weight)
        fused.lora_B.copy_(layer.lora_B["default"].weight)
        fused.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    truth = copy.deepcopy(layer).double()
    x, gy = torch.randn(5, 32), torch.randn(5, 24)
    fused.train()
    xg = x.clone().requires_grad_(True)
    y = fused(xg)
    y.backward(gy)
    assert len(CALLS) == 1
    y_ref, g_ref = run(truth, x.double(), gy.double(), True)
    tol = tolerance(torch.float32, "cpu")
    assert rel_error(y, y_ref) <= tol and rel_error(xg.grad, g_ref["x"]) <= tol
    assert rel_error(fused.magnitude.grad, g_ref["lora_magnitude_vector.default.weight"]) <= tol
    assert rel_error(fused.lora_A.grad, g_ref["lora_A.default.weight"]) <= tol
    assert rel_error(fused.lora_B.grad, g_ref["lora_B.default.weight"]) <= tol
    # merge: W' = (m/n)(W + sBA), as PEFT's merge; unmerge gives W back
    w0 = fused.weight.detach().clone()
    fused.eval()
    fused.merge()
    truth.merge()
    assert rel_error(fused.weight, truth.base_layer.weight) <= tol
    assert rel_error(fused(x), y_ref) <= tol
    fused.unmerge()
    assert rel_error(fused.weight, w0) <= tol and rel_error(fused(x), y_ref) <= tol


def test_zero_magnitude_column_gets_its_gradient():
    """m_j = 0 loses pre_j from y (y_j = b_j): its grad_m_j is recomputed, not 0/0."""
    layer = peft_dora(32, 24, 4, torch.float32, torch.float32, seed=8)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[[2, 5]] = 0
    fused, truth = patched(layer, "torch"), copy.deepcopy(layer).double()
    check_against(fused, truth, torch.randn(5, 32), torch.randn(5, 24), True, tolerance(torch.float32, "cpu"))


def test_norm_identity_and_weight_cache():
    """``weight_norm`` equals ‖W + sBA‖ (float64); ``‖W‖²`` is reused and recomputed on an edit."""
    W, A, B = torch.randn(40, 24, dtype=torch.float64), torch.randn(4, 24, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
    cache = dora.WeightNormCache()
    torch.testing.assert_close(dora.weight_norm(W, A, B, 0.7, cache), (W + 0.7 * B @ A).norm(dim=1), rtol=1e-12, atol=0)
    first = cache.get(W)
    assert cache.get(W) is first  # reused
    with torch.no_grad():
        W[3].mul_(2)  # in place: bumps W._version
    assert cache.get(W) is not first
    torch.testing.assert_close(dora.weight_norm(W, A, B, 0.7, cache), (W + 0.7 * B @ A).norm(dim=1), rtol=1e-12, atol=0)
    # bf16 W with fp32 A: the chunked upcast path
    Wb = W.to(torch.bfloat16)
    ref = (Wb.double() + 0.7 * B.float().double() @ A.float().double()).norm(dim=1)
    assert rel_error(dora.weight_norm(Wb, A.float(), B.float(), 0.7), ref) <= 1e-6


class BigFloats(TorchDispatchMode):
    """Records every floating-point tensor with at least ``numel`` elements that an op creates in new
    memory (views and aliases of its inputs, e.g. ``W.t()``, are not new tensors)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.numel:
                if t.untyped_storage().data_ptr() not in inputs:
                    self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_weight_sized_tensor_per_step(backend):
    """No op of a training step creates an N·K or K·K float tensor; the same tracker catches
    PEFT's DoRA (eye(K) and W + sΔW), so it can fail. (The torch backend upcasts a half W to
    float32 by design, DoRA or not, ``fastlora.ops.torch_lora``: it runs on an fp32 base here.)"""
    K, N, M = 96, 80, 4
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    layer = peft_dora(K, N, 4, dtype, torch.float32, seed=9)
    fused = patched(layer, backend)
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    for model, expect in ((fused, False), (layer, True)):
        model(x).float().sum().backward()  # the first step computes and caches ‖W‖²
        with BigFloats(min(N * K, K * K)) as tracker:
            model(x).float().sum().backward()
        assert bool(tracker.seen) == expect, tracker.seen


def test_bad_magnitude_is_a_clear_error():
    W, A, B = torch.randn(8, 6), torch.randn(2, 6), torch.zeros(8, 2)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        dora.dora_linear(torch.randn(3, 6), W, None, A, B, torch.ones(7), 1.0)


def test_backward_is_deterministic():
    layer = patched(peft_dora(32, 24, 4, torch.float32, torch.float32, seed=10), "torch")
    x, gy = torch.randn(7, 32), torch.randn(7, 24)
    first, second = run(layer, x, gy, True)[1], run(layer, x, gy, True)[1]
    assert all(torch.equal(first[n], second[n]) for n in first)


# --- a tiny PEFT Llama with use_dora=True -------------------------------------------------------


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def dora_llama():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True))
    randomize(model, 1)
    return model


def ids(seed=2):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_llama_dora_patched_in_full_matches_peft(tmp_path):
    reference = dora_llama()
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every DoRA layer is patched: no warning
        assert patch_peft(fused) == 14
    tokens = ids()
    (logits, grads), (ref_logits, ref_grads) = logits_and_grads(fused, tokens), logits_and_grads(reference, tokens)
    assert rel_error(logits, ref_logits) <= 1e-5
    assert len(CALLS) == 14
    assert grads.keys() == ref_grads.keys() and sum("magnitude" in n for n in grads) == 14
    for name in grads:
        assert rel_error(grads[name], ref_grads[name]) <= 1e-5, name
    losses = []
    for model in (reference, fused):
        losses.append(train_losses(model, (tokens for _ in range(8))))
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    fused.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert patch_peft(loaded) == 14
    torch.testing.assert_close(loaded(input_ids=tokens).logits, reference(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)


def test_save_adapter_roundtrips_with_peft(tmp_path):
    """fastlora's DoRA layers → save_adapter → PeftModel.from_pretrained gives the same logits, and
    load_adapter reads PEFT's save_pretrained back."""
    model = replace_linear_with_lora(tiny_llama(), 4, 8, target_modules=LLAMA_TARGETS, use_dora=True)
    randomize(model, 3)
    tokens = ids()
    expected = model(input_ids=tokens).logits
    save_adapter(model, tmp_path / "fl")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "fl")
    torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, rtol=1e-5, atol=1e-5)
    randomize(loaded, 4)
    loaded.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(input_ids=tokens).logits, loaded(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("M, N, dtype", [(1, 29, torch.float32), (70, 130, torch.bfloat16), (33, 64, torch.float16)])
def test_triton_backward_prologue_kernel(monkeypatch, M, N, dtype):
    """gy·g, Σ gy·y and Σ gy in one pass, against float64; buffers start as NaN; gy may be a
    stride-0 expansion (the backward of a sum)."""
    from fastlora.ops import _triton_common, dora_triton

    monkeypatch.setattr(_triton_common, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    y, scale = torch.randn(M, N).to(dtype), torch.rand(N) + 0.5
    for gy in (torch.randn(M, N).to(dtype), torch.randn(1, N).to(dtype).expand(M, N)):
        gy_s, dot, total = dora_triton.dora_grad_prologue(gy, y, scale, True)
        tol = tolerance(dtype, "cpu")
        assert gy_s.dtype == dtype and rel_error(gy_s, gy.double() * scale.double()) <= tol
        assert rel_error(dot, (gy.double() * y.double()).sum(0)) <= 1e-5
        assert rel_error(total, gy.double().sum(0)) <= 1e-5


def test_qdora_is_named_as_unsupported():
    """DoRA on a bitsandbytes 4-bit base: from_linear raises, patch_peft leaves it on PEFT and says why."""
    bnb = pytest.importorskip("bitsandbytes")
    linear = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear.load_state_dict(nn.Linear(64, 32).state_dict())
    linear = linear.to("cpu")  # quantizes
    with pytest.raises(NotImplementedError, match="QDoRA"):
        FusedLoRALinear.from_linear(linear, use_dora=True)
    model = peft.get_peft_model(nn.Sequential(linear), peft.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    with pytest.warns(UserWarning, match="QDoRA"):
        assert patch_peft(model) == 0


def test_autocast_matches_float64():
    """Under torch.autocast (bf16) the DoRA layer computes what PEFT's layer computes, within bf16's bound."""
    layer = peft_dora(32, 24, 4, torch.float32, torch.float32, seed=12)
    fused, truth = patched(layer, "torch"), copy.deepcopy(layer).double()
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert CALLS and y.dtype == torch.bfloat16
    assert rel_error(y, truth(x.to(torch.bfloat16).double())) <= tolerance(torch.bfloat16, "cpu")


def test_patched_dora_layer_states_run_peft():
    """Merged and disabled DoRA layers run PEFT's own forward; unmerged, fastlora's again."""
    layer = peft_dora(32, 24, 4, torch.float32, torch.float32, seed=13)
    fused, truth = patched(layer, "torch"), copy.deepcopy(layer).double().eval()
    x = torch.randn(5, 32)
    fused.eval()
    expected = truth(x.double())
    fused.merge()
    assert rel_error(fused(x), expected) <= 1e-5 and not CALLS
    fused.unmerge()
    assert rel_error(fused(x), expected) <= 1e-5 and len(CALLS) == 1
    with _disabled(fused):
        assert rel_error(fused(x), torch.nn.functional.linear(x.double(), truth.base_layer.weight, truth.base_layer.bias)) <= 1e-5
    assert len(CALLS) == 1


class _disabled:
    """PEFT's adapters switched off on one layer (``enable_adapters(False)``), then back on."""

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.layer.enable_adapters(False)

    def __exit__(self, *exc):
        self.layer.enable_adapters(True)


CUDA_BACKENDS = backends_on("cuda") if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["torch"])
def test_cuda_paths(backend):
    """The CUDA-only code: W Aᵀ through the hi/lo bf16 GEMM with fp32 output, the zero-m flag's
    async copy to pinned memory, on a patched PEFT layer (bf16 base, fp32 adapters) against float64."""
    layer = peft_dora(256, 192, 16, torch.bfloat16, torch.float32, seed=14)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[7] = 0
    truth = copy.deepcopy(layer).double()
    fused = patched(layer, backend).cuda()
    x, gy = torch.randn(64, 256).to(torch.bfloat16), torch.randn(64, 192).to(torch.bfloat16)
    calls = len(CALLS)
    y, grads = run(fused, x.cuda(), gy.cuda(), True)
    assert len(CALLS) == calls + 1
    y_ref, grads_ref = run(truth, x.double(), gy.double(), True)
    assert rel_error(y.cpu(), y_ref) <= 1e-2
    for name in grads_ref:
        assert rel_error(grads[name].cpu(), grads_ref[name]) <= 1e-2, name
    W = fused.base_layer.weight
    A, B = fused.lora_A["default"].weight, fused.lora_B["default"].weight
    exact = (W.double() + 2.0 * B.double() @ A.double()).norm(dim=1)
    assert rel_error(dora.weight_norm(W, A, B, 2.0), exact) <= 1e-5


def test_a_norm_computed_inside_a_capture_is_not_cached(monkeypatch):
    """Inside a CUDA-graph capture ‖W‖² is recorded, not computed: caching it would give an eager call
    before the first replay garbage norms (seen by reading; a capture is simulated here)."""
    weight = torch.randn(12, 8, dtype=torch.float64)
    cache = dora.WeightNormCache()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dora, "_capturing", lambda device: True)
    first = cache.get(weight)
    torch.testing.assert_close(first, weight.square().sum(1))  # on the CPU the values are there at once
    assert cache._key is None and cache._value is None
    monkeypatch.setattr(dora, "_capturing", lambda device: False)
    assert cache.get(weight) is not first and cache._value is not None
