"""``save_adapter`` / ``load_adapter``: PEFT's on-disk format, both ways, loaded in place."""

import copy
import json

import pytest
import torch
from torch import nn

from fastlora import FusedLoRALinear, replace_linear_with_lora
from fastlora.adapters import load_adapter, save_adapter

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """Nested module paths (``blocks.0.up``) and a layer left plain (``head``)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# (fastlora conversions as (target_modules, r, alpha), the PEFT LoraConfig that matches them)
PEFT_BASE = {"r": 4, "lora_alpha": 8, "target_modules": ["up", "down"]}
CASES = {
    "uniform": ([(["up", "down"], 4, 8)], PEFT_BASE),
    "rslora": ([(["up", "down"], 4, 8)], {**PEFT_BASE, "use_rslora": True}),
    "patterns": ([(["up"], 4, 8), (["down"], 2, 6)], {**PEFT_BASE, "rank_pattern": {"down": 2}, "alpha_pattern": {"down": 6}}),
}


def base_net():
    torch.manual_seed(0)
    return Net()


def randomize_lora_B(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)


def fastlora_net(conversions, use_rslora=False):
    model = base_net()
    for targets, r, alpha in conversions:
        replace_linear_with_lora(model, r, alpha, targets, use_rslora=use_rslora)
    return model


def x():
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("case", CASES)
def test_fastlora_to_peft(case, tmp_path):
    conversions, lora_config = CASES[case]
    model = fastlora_net(conversions, lora_config.get("use_rslora", False))
    randomize_lora_B(model)
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base_net(), tmp_path)
    torch.testing.assert_close(loaded(x()), model(x()))


@pytest.mark.parametrize("case", CASES)
def test_peft_to_fastlora(case, tmp_path):
    conversions, lora_config = CASES[case]
    peft_model = peft.get_peft_model(base_net(), peft.LoraConfig(**lora_config))
    randomize_lora_B(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = fastlora_net(conversions, lora_config.get("use_rslora", False))
    load_adapter(model, tmp_path)
    torch.testing.assert_close(model(x()), peft_model(x()))


def test_load_is_in_place(tmp_path):
    source = fastlora_net(CASES["uniform"][0])
    randomize_lora_B(source)
    save_adapter(source, tmp_path)
    target = fastlora_net(CASES["uniform"][0])
    params = {name: (p, p.data_ptr()) for name, p in target.named_parameters()}
    load_adapter(target, tmp_path)
    for name, p in target.named_parameters():
        assert p is params[name][0] and p.data_ptr() == params[name][1]
    torch.testing.assert_close(target(x()), source(x()))


def test_saved_config(tmp_path):
    save_adapter(fastlora_net(CASES["patterns"][0]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    assert config["rank_pattern"] == {r"blocks\.0\.down": 2, r"blocks\.1\.down": 2}
    assert peft.LoraConfig.from_pretrained(tmp_path).alpha_pattern == {r"blocks\.0\.down": 6, r"blocks\.1\.down": 6}


@pytest.mark.parametrize(
    "source, target, match",
    [
        ([(["up"], 4, 8)], [(["up", "down"], 4, 8)], "keys missing"),
        ([(["up", "down"], 4, 8)], [(["up"], 4, 8)], "unexpected keys"),
        ([(["up", "down"], 4, 8)], [(["up", "down"], 2, 4)], "rank mismatch"),
        ([(["up", "down"], 4, 8)], [(["up", "down"], 4, 16)], "scaling mismatch"),
    ],
)
def test_mismatches_raise_and_leave_model_unchanged(source, target, match, tmp_path):
    source_model = fastlora_net(source)
    randomize_lora_B(source_model)
    save_adapter(source_model, tmp_path)
    model = fastlora_net(target)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_shape_mismatch(tmp_path):
    save_adapter(fastlora_net(CASES["uniform"][0]), tmp_path)
    model = fastlora_net(CASES["uniform"][0])
    model.blocks[0].up = FusedLoRALinear(8, 32, r=4, alpha=8)
    with pytest.raises(ValueError, match="shape mismatch at blocks.0.up"):
        load_adapter(model, tmp_path)


def test_rejects_other_adapters(tmp_path):
    with pytest.raises(ValueError, match="no FusedLoRALinear"):
        save_adapter(base_net(), tmp_path)
    dora = peft.get_peft_model(base_net(), peft.LoraConfig(**PEFT_BASE, use_dora=True))
    dora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unexpected keys.*lora_magnitude_vector"):
        load_adapter(fastlora_net(CASES["uniform"][0]), tmp_path)
