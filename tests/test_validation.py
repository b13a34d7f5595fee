"""Bad input at every public entry point fails early with a message naming the argument, the
expected and the actual value; nothing reaches a kernel."""

import math
import re
import types

import pytest
import torch
from helpers import make_inputs
from torch import nn

import fastlora
from fastlora import BackendUnavailableError, FusedLoRALinear, lora_linear, replace_linear_with_lora
from fastlora.ops import registry
from fastlora.ops.registry import backend_ops

AVAILABLE = fastlora.available_backends()
FLOATS = "(float16, bfloat16, float32 or float64)"
needs_triton = pytest.mark.skipif(not AVAILABLE["triton"].available, reason="triton backend unavailable")


def inputs(dtype=torch.float32, r=2):
    """x [4, 8], weight [6, 8], bias [6], lora_A [r, 8], lora_B [6, r]: a valid call to break."""
    return list(make_inputs(4, 8, 6, r, dtype))


X, WEIGHT, BIAS, LORA_A, LORA_B = range(5)


def call_with(index: int, value):
    """``lora_linear`` on valid inputs but for argument ``index``, which is ``value``."""
    args = inputs()
    args[index] = value
    return lora_linear(*args, 1.0)


@pytest.mark.parametrize(
    "index, value, error, message",
    [
        (X, [[1.0] * 8], TypeError, "x must be a torch.Tensor, got list"),
        (X, torch.ones(4, 8, dtype=torch.int32), TypeError, "x must be a floating-point tensor (float16, bfloat16, float32 or float64), got torch.int32"),
        (WEIGHT, torch.ones(6, 8, dtype=torch.complex64), TypeError, "weight must be a floating-point tensor"),
        (X, torch.tensor(1.0), ValueError, "x must have at least one dimension [..., in_features], got a 0-D tensor"),
        (WEIGHT, torch.randn(6), ValueError, "weight must be 2-D [out_features, in_features], got shape (6,)"),
        (LORA_A, torch.randn(1, 2, 8), ValueError, "lora_A must be 2-D [r, in_features], got shape (1, 2, 8)"),
        (X, torch.randn(4, 7), ValueError, "x's last dimension must equal weight.shape[1] = in_features = 8, got x of shape (4, 7)"),
        (LORA_A, torch.randn(2, 7), ValueError, "lora_A must have shape [r, in_features=8], got (2, 7)"),
        (LORA_B, torch.randn(6, 3), ValueError, "lora_B must have shape [out_features=6, r=2], got (6, 3)"),
        (LORA_B, torch.randn(2, 6), ValueError, "lora_B must have shape [out_features=6, r=2], got (2, 6)"),
        (BIAS, torch.randn(5), ValueError, "bias must have shape [out_features=6], got (5,)"),
        (BIAS, torch.randn(1, 6), ValueError, "bias must have shape [out_features=6], got (1, 6)"),
    ],
)
def test_wrong_kind_rank_or_size(index, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call_with(index, value)


def test_zero_in_features():
    x, w, b, A, B = torch.randn(4, 0), torch.randn(6, 0), torch.randn(6), torch.randn(2, 0), torch.randn(6, 2)
    with pytest.raises(ValueError, match=re.escape("weight must have shape [out_features, in_features] with both >= 1, got (6, 0)")):
        lora_linear(x, w, b, A, B, 1.0)


def test_zero_out_features():
    x, w, A, B = torch.randn(4, 8), torch.randn(0, 8), torch.randn(2, 8), torch.randn(0, 2)
    with pytest.raises(ValueError, match=re.escape("weight must have shape [out_features, in_features] with both >= 1, got (0, 8)")):
        lora_linear(x, w, None, A, B, 1.0)


def test_rank_zero():
    x, w, b, _, _ = inputs()
    with pytest.raises(ValueError, match=re.escape("lora_A must have at least one row (r >= 1), got shape (0, 8)")):
        lora_linear(x, w, b, torch.randn(0, 8), torch.randn(6, 0), 1.0)


@pytest.mark.parametrize("index, name", [(WEIGHT, "weight"), (BIAS, "bias"), (LORA_A, "lora_A"), (LORA_B, "lora_B")])
def test_tensor_on_another_device(index, name):
    # "meta" stands in for a second device: a device mismatch is caught before any kernel runs.
    args = inputs()
    args[index] = args[index].detach().to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu; move all tensors to one device"):
        lora_linear(*args, 1.0)


@pytest.mark.parametrize(
    "index, dtype, message",
    [
        (WEIGHT, torch.float16, "weight's dtype must equal x's dtype torch.float32, got torch.float16"),
        (BIAS, torch.bfloat16, "bias's dtype must equal x's dtype torch.float32, got torch.bfloat16"),
        (LORA_B, torch.float64, "lora_B's dtype must equal lora_A's dtype torch.float32, got torch.float64"),
    ],
)
def test_mixed_dtypes(index, dtype, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        call_with(index, inputs()[index].detach().to(dtype))


def test_adapters_in_a_third_dtype():
    x, w, b, A, B = inputs(torch.float16)
    with pytest.raises(TypeError, match=re.escape("adapters (lora_A, lora_B) must be float32 or x's dtype torch.float16, got torch.bfloat16")):
        lora_linear(x, w, b, A.bfloat16(), B.bfloat16(), 1.0)


@needs_triton
def test_float64_on_a_fused_backend_names_the_fix():
    with pytest.raises(TypeError, match=re.escape("backend='triton' supports float16, bfloat16 and float32, got torch.float64; use backend='torch'")):
        lora_linear(*inputs(torch.float64), 1.0, backend="triton")


@needs_triton
def test_rank_above_the_fused_limit_names_the_fix():
    with pytest.raises(ValueError, match=re.escape("backend='triton' supports r <= 256, got r=257; use backend='torch'")):
        lora_linear(*inputs(r=257), 1.0, backend="triton")


@needs_triton
def test_cpu_tensors_to_a_gpu_only_backend(monkeypatch):
    # Off the interpreter the triton backend runs on CUDA tensors only; pretend that is the case here.
    gpu_only = backend_ops("triton")._replace(runs_on=("cuda",))
    monkeypatch.setitem(registry._loaded, "triton", gpu_only)
    with pytest.raises(ValueError, match=re.escape("backend='triton' runs on cuda tensors, got tensors on cpu; use backend='torch' or 'auto'")):
        lora_linear(*inputs(), 1.0, backend="triton")


@pytest.mark.skipif(AVAILABLE["cuda"].available, reason="the cuda backend is available here")
def test_unavailable_backend_says_why_and_what_to_use_instead():
    with pytest.raises(BackendUnavailableError) as info:
        lora_linear(*inputs(), 1.0, backend="cuda")
    assert str(info.value) == f"backend='cuda' is unavailable: {AVAILABLE['cuda'].detail}; use backend='torch' or 'auto'"


@pytest.mark.parametrize(
    "scaling, error, message",
    [
        (math.nan, ValueError, "scaling must be finite, got nan"),
        (math.inf, ValueError, "scaling must be finite, got inf"),
        (-math.inf, ValueError, "scaling must be finite, got -inf"),
        (True, TypeError, "scaling must be a real number (a Python float), got bool"),
        ("2.0", TypeError, "scaling must be a real number (a Python float), got str"),
        (torch.tensor(2.0), TypeError, "scaling must be a real number (a Python float), got Tensor"),
    ],
    ids=repr,
)
def test_bad_scaling(scaling, error, message):
    with pytest.raises(error, match=re.escape(message)):
        lora_linear(*inputs(), scaling)


@pytest.mark.parametrize(
    "backend, hint",
    [("trition", " (did you mean 'triton'?)"), ("Triton", " (did you mean 'triton'?)"), ("tourch", " (did you mean 'torch'?)"),
     ("cublas", " (did you mean 'cuda'?)"), ("gpu", ""), ("", ""), (None, "")],
)
def test_unknown_backend_gets_did_you_mean(backend, hint):
    message = f"backend must be one of ('auto', 'torch', 'triton', 'cuda'), got {backend!r}{hint}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        lora_linear(*inputs(), 1.0, backend=backend)
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        FusedLoRALinear(8, 6, backend=backend)


@pytest.mark.parametrize("alpha", [0, 0.0, -16, -1e-3])
def test_layers_reject_zero_or_negative_alpha(alpha):
    """A layer's alpha must be > 0: 0 switches the adapter off (and its gradients), a negative one
    only flips lora_B's sign. Each constructor says so before building anything."""
    message = f"alpha must be > 0 (scaling = alpha / r multiplies the adapter; 0 switches it off and stops its gradients, a negative alpha only flips lora_B's sign), got {float(alpha):g}"
    with pytest.raises(ValueError, match=re.escape(message)):
        FusedLoRALinear(8, 6, r=2, alpha=alpha)
    with pytest.raises(ValueError, match=re.escape(message)):
        FusedLoRALinear.from_linear(nn.Linear(8, 6), r=2, alpha=alpha)
    model = attention_block()
    with pytest.raises(ValueError, match=re.escape(message)):
        replace_linear_with_lora(model, r=2, alpha=alpha)
    assert type(model["q_proj"]) is nn.Linear and type(model["v_proj"]) is nn.Linear


@pytest.mark.parametrize("scaling", [0.0, -0.5])
def test_lora_linear_takes_any_finite_scaling(scaling):
    """The functional form computes the formula it is given (PEFT allows any float lora_alpha, and
    patch_peft passes PEFT's scaling through): zero and negative scalings are computed, not refused."""
    x, w, b, A, B = inputs(torch.float64)  # lora_B random, not zero: the scaling matters
    expected = fastlora.reference.lora_linear(x, w, b, A, B, scaling)
    assert not torch.allclose(expected, fastlora.reference.lora_linear(x, w, b, A, B, 1.0))
    torch.testing.assert_close(lora_linear(x, w, b, A, B, scaling, backend="torch"), expected, rtol=1e-12, atol=1e-12)


def test_named_fused_backend_that_cannot_load_fails_at_construction(monkeypatch):
    """What can be known without an input is checked when the layer is built: the backend is not
    installed / did not load, or no device it runs on exists here."""
    monkeypatch.setitem(registry._loaded, "triton", "the triton package is not installed; install it with `pip install triton`")
    with pytest.raises(BackendUnavailableError, match=re.escape("backend='triton' is unavailable: the triton package is not installed")):
        FusedLoRALinear(8, 6, backend="triton")
    with pytest.raises(BackendUnavailableError, match=re.escape("backend='triton' is unavailable")):
        FusedLoRALinear.from_linear(nn.Linear(8, 6), backend="triton")
    FusedLoRALinear(8, 6, backend="auto")  # auto falls back; torch always loads


@needs_triton
def test_named_gpu_backend_without_a_gpu_fails_at_construction(monkeypatch):
    """A backend that runs on CUDA tensors only, on a machine that has no CUDA device."""
    backend_ops("triton")  # loaded, then stood in for by one whose ops run on CUDA only (the GPU build's)
    monkeypatch.setitem(registry._loaded, "triton", types.SimpleNamespace(runs_on=("cuda",)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match=re.escape("backend='triton' runs on CUDA tensors and no CUDA device is visible")):
        FusedLoRALinear(8, 6, backend="triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FusedLoRALinear(8, 6, backend="triton")  # a GPU exists: the device of each call is checked then


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"in_features": 0}, ValueError, "in_features must be a positive int, got 0"),
        ({"out_features": -3}, ValueError, "out_features must be a positive int, got -3"),
        ({"in_features": 8.0}, TypeError, "in_features must be a positive int, got float 8.0"),
        ({"out_features": True}, TypeError, "out_features must be a positive int, got bool True"),
        ({"r": 0}, ValueError, "r (the LoRA rank) must be a positive int, got 0"),
        ({"r": "8"}, TypeError, "r (the LoRA rank) must be a positive int, got str '8'"),
        ({"alpha": math.nan}, ValueError, "alpha must be finite, got nan"),
        ({"alpha": "16"}, TypeError, "alpha must be a real number (a Python float), got str"),
        ({"backend": "cublas"}, ValueError, "backend must be one of ('auto', 'torch', 'triton', 'cuda'), got 'cublas'"),
        ({"alpha": 0}, ValueError, "alpha must be > 0"),
        ({"dtype": torch.int32}, TypeError, f"dtype must be a floating-point torch.dtype {FLOATS}, got torch.int32"),
        ({"dtype": "float32"}, TypeError, f"dtype must be a floating-point torch.dtype {FLOATS}, got str 'float32'"),
        ({"adapter_dtype": torch.int8}, TypeError, f"adapter_dtype must be a floating-point torch.dtype {FLOATS}, got torch.int8"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_bad_layer_configuration(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        FusedLoRALinear(**{"in_features": 8, "out_features": 6, **kwargs})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"r": -1}, ValueError, "r (the LoRA rank) must be a positive int, got -1"),
        ({"alpha": math.inf}, ValueError, "alpha must be finite, got inf"),
        ({"backend": "gpu"}, ValueError, "backend must be one of"),
        ({"adapter_dtype": torch.int64}, TypeError, f"adapter_dtype must be a floating-point torch.dtype {FLOATS}, got torch.int64"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_bad_from_linear_configuration(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        FusedLoRALinear.from_linear(nn.Linear(8, 6), **kwargs)


@needs_triton
def test_layer_rank_above_the_fused_limit_fails_on_first_call():
    layer = FusedLoRALinear(8, 6, r=257, backend="triton")
    with pytest.raises(ValueError, match=re.escape("backend='triton' supports r <= 256, got r=257")):
        layer(torch.randn(3, 8))


def attention_block():
    return nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "act": nn.ReLU()})


def test_misspelt_target_is_named_with_close_names_and_nothing_is_replaced():
    model = attention_block()
    with pytest.raises(ValueError, match=re.escape("'q_prj' matches no module (did you mean 'q_proj'")):
        replace_linear_with_lora(model, r=2, alpha=4, target_modules=["v_proj", "q_prj"])
    # Validation runs before any replacement: a failed call leaves the model as it was.
    assert type(model["v_proj"]) is nn.Linear


def test_target_that_matches_only_other_modules():
    model = replace_linear_with_lora(attention_block(), r=2, alpha=4, target_modules="q_proj")
    with pytest.raises(ValueError, match=re.escape("'q_proj' matches only modules that are not nn.Linear: q_proj (FusedLoRALinear)")):
        replace_linear_with_lora(model, r=2, alpha=4, target_modules="q_proj")
    with pytest.raises(ValueError, match=re.escape("'act' matches only modules that are not nn.Linear: act (ReLU)")):
        replace_linear_with_lora(model, r=2, alpha=4, target_modules=["act"])


@pytest.mark.parametrize(
    "target_modules, error, message",
    [
        (5, TypeError, "target_modules must be None, a module name or a list of names, got 5"),
        (["q_proj", nn.Linear], TypeError, "target_modules must be None, a module name or a list of names"),
        ([], ValueError, "target_modules must name at least one module, got an empty list"),
    ],
    ids=["int", "non-str-item", "empty"],
)
def test_bad_target_modules(target_modules, error, message):
    with pytest.raises(error, match=re.escape(message)):
        replace_linear_with_lora(attention_block(), r=2, alpha=4, target_modules=target_modules)


def test_model_without_linear_layers():
    with pytest.raises(ValueError, match=re.escape("model (Sequential) has no nn.Linear submodule to replace")):
        replace_linear_with_lora(nn.Sequential(nn.ReLU()), r=2, alpha=4)


@pytest.mark.parametrize("kwargs, message", [({"r": 0}, "r (the LoRA rank)"), ({"alpha": math.nan}, "alpha must be finite")])
def test_bad_replace_configuration(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        replace_linear_with_lora(attention_block(), **{"r": 2, "alpha": 4, **kwargs})


def test_non_float_dtypes_are_named_before_anything_is_replaced():
    model = attention_block()
    with pytest.raises(TypeError, match=re.escape(f"adapter_dtype must be a floating-point torch.dtype {FLOATS}, got torch.bool")):
        replace_linear_with_lora(model, r=2, alpha=4, adapter_dtype=torch.bool)
    model["v_proj"].weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)  # a quantized store
    with pytest.raises(TypeError, match=re.escape(f"v_proj.weight's dtype must be a floating-point torch.dtype {FLOATS}, got torch.int8")):
        replace_linear_with_lora(model, r=2, alpha=4)
    assert type(model["q_proj"]) is nn.Linear and type(model["v_proj"]) is nn.Linear


def transformer_like():
    """Two blocks of q/v projections and an MLP, plus an lm_head that get_output_embeddings names."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(
                nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "mlp": nn.Linear(8, 8)}) for _ in range(2)
            )
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 5)

        def get_output_embeddings(self):
            return self.lm_head

    return Tiny()


def lora_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, FusedLoRALinear))


def test_all_linear_is_every_linear_but_the_output_layer():
    model = replace_linear_with_lora(transformer_like(), target_modules="all-linear")
    assert lora_names(model) == [f"layers.{i}.{n}" for i in range(2) for n in ("mlp", "q_proj", "v_proj")]
    assert type(model.lm_head) is nn.Linear
    # Without get_output_embeddings (nn.Sequential) PEFT has no output layer to leave out: all of them.
    seq = replace_linear_with_lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), target_modules="ALL-LINEAR")
    assert lora_names(seq) == ["0", "2"]


def test_string_target_is_a_full_match_regex_as_in_peft():
    model = replace_linear_with_lora(transformer_like(), target_modules=r"layers\.\d+\.(q_proj|v_proj)")
    assert lora_names(model) == [f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    # A list keeps the suffix rule; a bare name as a string must match a whole name, so it is refused with the fix.
    assert lora_names(replace_linear_with_lora(transformer_like(), target_modules=["mlp"])) == ["layers.0.mlp", "layers.1.mlp"]
    with pytest.raises(ValueError, match=re.escape("target_modules='mlp' matches no whole module name (did you mean target_modules=['mlp']")):
        replace_linear_with_lora(transformer_like(), target_modules="mlp")
    with pytest.raises(ValueError, match=re.escape("target_modules='.*q_prj' matches no module name (did you mean 'q_proj' or 'v_proj'?); a string is a regular expression")):
        replace_linear_with_lora(transformer_like(), target_modules=".*q_prj")
    with pytest.raises(ValueError, match=re.escape("target_modules='(q_proj' is not a valid regular expression")):
        replace_linear_with_lora(transformer_like(), target_modules="(q_proj")


def test_replace_freezes_everything_but_the_adapters_by_default():
    model = replace_linear_with_lora(transformer_like(), target_modules=["q_proj"])
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"layers.{i}.q_proj.lora_{ab}" for i in range(2) for ab in "AB"]
    kept = replace_linear_with_lora(transformer_like(), target_modules=["q_proj"], freeze=False)
    trainable = {name for name, p in kept.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable and "norm.weight" in trainable and "layers.0.mlp.weight" in trainable
    assert "layers.0.q_proj.weight" not in trainable  # a replaced layer's base is frozen either way
    with pytest.raises(TypeError, match=re.escape("freeze must be a bool, got str 'yes'")):
        replace_linear_with_lora(transformer_like(), freeze="yes")


def test_replace_and_the_layer_share_defaults():
    """r=8, alpha=16 unless given, in both (they used to differ: replace required alpha)."""
    model = replace_linear_with_lora(attention_block())
    default = FusedLoRALinear(8, 8)
    assert (model["q_proj"].r, model["q_proj"].alpha, model["q_proj"].scaling) == (default.r, default.alpha, default.scaling) == (8, 16.0, 2.0)
