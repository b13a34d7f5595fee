"""FusedLoRALinear under activation checkpointing and CPU autocast."""

import pytest
import torch
from helpers import rel_error
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastlora import FusedLoRALinear


def block(dtype=torch.float32) -> nn.Sequential:
    """Two FusedLoRALinear with fp32 adapters on a ``dtype`` base; the same values for every dtype."""
    torch.manual_seed(0)
    bases = nn.Linear(16, 32), nn.Linear(32, 16)
    first, second = (FusedLoRALinear.from_linear(b.to(dtype), 4, 8, adapter_dtype=torch.float32) for b in bases)
    with torch.no_grad():
        first.lora_B.normal_(std=0.1)
        second.lora_B.normal_(std=0.1)
    return nn.Sequential(first, nn.GELU(), second)


def grads(model, x, run=lambda model, x: model(x)):
    x = x.detach().requires_grad_(True)
    out = run(model, x)
    out.float().square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return out.detach(), [x.grad] + [p.grad for p in trainable]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    x = torch.randn(2, 5, 16)
    expected = grads(block(), x)
    out, got = grads(block(), x, lambda model, x: checkpoint(model, x, use_reentrant=use_reentrant))
    torch.testing.assert_close(out, expected[0])
    for g, e in zip(got, expected[1], strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_cpu_autocast(dtype):
    """As ``nn.Linear`` under autocast: a bf16 output from an fp32 input, fp32 adapter grads, close
    to the fp32 computation."""
    x = torch.randn(2, 5, 16)
    expected = grads(block(), x)
    model = block(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, got = grads(model, x)
    assert out.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert rel_error(out, expected[0]) <= 2e-2
    for g, e in zip(got, expected[1], strict=True):
        assert rel_error(g, e) <= 2e-2
