"""``FusedLoRALinear.merge`` / ``unmerge`` and ``merge_and_unload``."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_error, tolerance
from torch import nn

from fastlora import FusedLoRALinear, replace_linear_with_lora
from fastlora.layers import merge_and_unload

# (base dtype, adapter dtype): PEFT's fp32 adapters on a half base included.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]


def random_layer(dtype, adapter_dtype, seed=0):
    torch.manual_seed(seed)
    layer = FusedLoRALinear(48, 40, r=4, alpha=8, dtype=dtype, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    return layer


@pytest.mark.parametrize("dtype, adapter_dtype", DTYPES)
def test_merge_then_unmerge(dtype, adapter_dtype):
    layer = random_layer(dtype, adapter_dtype)
    x = torch.randn(6, 48).to(dtype)
    weight, ptr = layer.weight.detach().clone(), layer.weight.data_ptr()
    expected = layer(x)

    layer.merge()
    merged_weight = layer.weight.detach().clone()
    assert layer.merged and layer.weight.data_ptr() == ptr
    assert torch.equal(layer(x), F.linear(x, merged_weight, layer.bias))  # the base product only
    assert rel_error(layer(x), expected) <= tolerance(dtype, "cpu")
    layer.merge()  # already merged: no-op
    assert torch.equal(layer.weight, merged_weight)

    layer.unmerge()
    assert not layer.merged and layer.weight.data_ptr() == ptr
    # One rounding step of the dtype, relative to the larger of W and the merged W.
    step = torch.finfo(dtype).eps * torch.maximum(weight.abs(), merged_weight.abs()).float()
    assert ((layer.weight.float() - weight.float()).abs() <= step).all()
    assert rel_error(layer(x), expected) <= tolerance(dtype, "cpu")


def test_merge_keeps_float64_precision():
    layer = random_layer(torch.float64, torch.float64)
    expected = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    layer.merge()
    torch.testing.assert_close(layer.weight, expected.detach(), rtol=1e-12, atol=1e-12)


def test_merge_and_unload():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 8, bias=False)))
    replace_linear_with_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, FusedLoRALinear):
                layer.lora_B.normal_(std=0.1)
    weights = [model[0].weight, model[2][0].weight]
    x = torch.randn(5, 16)
    expected = model(x)

    assert merge_and_unload(model) is model
    assert type(model[0]) is nn.Linear and type(model[2][0]) is nn.Linear
    assert model[0].weight is weights[0] and model[2][0].weight is weights[1] and model[2][0].bias is None
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert rel_error(model(x), expected) <= 1e-5

    layer = random_layer(torch.float32, torch.float32)
    unloaded = merge_and_unload(layer)
    assert type(unloaded) is nn.Linear and unloaded.weight is layer.weight and unloaded.bias is layer.bias
