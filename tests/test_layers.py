"""FusedLoRALinear and replace_linear_with_lora: the module-level contract."""

import math

import pytest
import torch
from helpers import BACKEND_DEVICE, rel_error, tolerance
from torch import nn

import fastlora
from fastlora import FusedLoRALinear, replace_linear_with_lora


def randomize_adapters(layer: FusedLoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.normal_()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_new_layer_equals_its_base(backend, device):
    base = nn.Linear(40, 24, device=device)
    layer = FusedLoRALinear.from_linear(base, r=4, alpha=8, backend=backend)
    x = torch.randn(3, 5, 40, device=device)
    assert torch.allclose(layer(x), base(x), rtol=1e-5, atol=1e-5)


def test_init_follows_peft():
    layer = FusedLoRALinear(64, 32, r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=√5) on [r, in]: U(-1/√in, 1/√in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert layer.scaling == 2.0
    assert FusedLoRALinear(64, 32, r=16, alpha=16, use_rslora=True).scaling == pytest.approx(4.0)


def test_from_linear_shares_storage_and_freezes_the_base():
    base = nn.Linear(16, 8)
    layer = FusedLoRALinear.from_linear(base, r=2, alpha=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.device == base.weight.device and layer.lora_A.dtype == base.weight.dtype


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_only_adapters_and_input_get_gradients(backend, device):
    layer = FusedLoRALinear(20, 12, r=3, alpha=6, backend=backend, device=device)
    randomize_adapters(layer)
    x = torch.randn(7, 20, device=device, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_matches_reference(backend, device, dtype):
    layer = FusedLoRALinear(36, 28, r=5, alpha=10, backend=backend, device=device, dtype=dtype)
    randomize_adapters(layer)
    x = torch.randn(2, 9, 36, device=device, dtype=dtype)
    ref = fastlora.reference.lora_linear(
        x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(), layer.lora_B.double(), layer.scaling
    )
    assert rel_error(layer(x), ref) <= tolerance(dtype, device)


def test_state_dict_keys_and_shapes():
    layer = FusedLoRALinear(10, 6, r=3)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "weight": (6, 10),
        "bias": (6,),
        "lora_A": (3, 10),
        "lora_B": (6, 3),
    }
    assert "bias" not in FusedLoRALinear(10, 6, r=3, bias=False).state_dict()


def test_fp32_adapters_on_a_half_base():
    layer = FusedLoRALinear(16, 8, r=2, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert layer(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_extra_repr_names_the_configuration():
    text = repr(FusedLoRALinear(16, 8, r=4, alpha=8, bias=False))
    for part in ("in_features=16", "out_features=8", "bias=False", "r=4", "alpha=8", "scaling=2", "backend='auto'"):
        assert part in text


@pytest.mark.parametrize("kwargs, error", [({"r": 0}, ValueError), ({"backend": "cublas"}, ValueError), ({"alpha": float("nan")}, ValueError)])
def test_bad_configuration_raises(kwargs, error):
    with pytest.raises(error):
        FusedLoRALinear(8, 8, **kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedLoRALinear.from_linear(nn.Conv1d(4, 4, 1))


def _toy_model():
    return nn.Sequential(
        nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "mlp": nn.Sequential(nn.Linear(8, 16))}),
        nn.Linear(16, 4),
    )


def test_replace_linear_with_lora_converts_every_linear_recursively():
    model = _toy_model()
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    replace_linear_with_lora(model, r=2, alpha=4)
    layers = [m for m in model.modules() if isinstance(m, FusedLoRALinear)]
    assert len(layers) == 4 and all(m.r == 2 and m.scaling == 2.0 for m in layers)
    assert [m.weight for m in layers] == weights  # shared, not copied
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_replace_linear_with_lora_honours_target_modules():
    model = replace_linear_with_lora(_toy_model(), r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    assert isinstance(model[0]["q_proj"], FusedLoRALinear) and isinstance(model[0]["v_proj"], FusedLoRALinear)
    assert type(model[0]["mlp"][0]) is nn.Linear and type(model[1]) is nn.Linear


def test_compiled_module_matches_eager_without_graph_breaks():
    torch._dynamo.reset()
    layer = FusedLoRALinear(24, 16, r=4, alpha=8)
    randomize_adapters(layer)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    eager_out = layer(x)
    eager_grads = torch.autograd.grad(eager_out.sum(), [x, layer.lora_A, layer.lora_B])
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), [x, layer.lora_A, layer.lora_B])
    assert torch.allclose(out, eager_out, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-6)


def test_dropout_applies_in_training_mode_only():
    layer = FusedLoRALinear(32, 16, r=4, alpha=8, dropout=0.5)
    randomize_adapters(layer)
    x = torch.randn(6, 32)
    no_dropout = fastlora.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert torch.equal(layer.eval()(x), no_dropout)
    assert not torch.allclose(layer.train()(x), no_dropout)


def test_merged_layer_serves_in_eval_and_refuses_to_train_with_dropout():
    layer = FusedLoRALinear(8, 8, r=2, dropout=0.1)
    randomize_adapters(layer)
    x = torch.randn(2, 8)
    unmerged = layer.eval()(x)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.train()(x)
