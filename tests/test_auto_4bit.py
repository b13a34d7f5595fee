"""QLoRA's fused 4-bit path under ``backend="auto"`` goes through the same correctness gate as the
dense backends (``fastlora.ops.auto_4bit``), checked on the CPU with the gate enabled for CPU
tensors (it runs on CUDA only by default) and the 4-bit kernels under the Triton interpreter."""

import pytest
import torch
from helpers import rel_error, tolerance

pytest.importorskip("bitsandbytes")
triton_qlora = pytest.importorskip("fastlora.ops.triton_qlora")

from fastlora import qlora  # noqa: E402
from fastlora.ops import auto  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_qlora.INTERPRET and not torch.cuda.is_available(), reason="needs the interpreter")


@pytest.fixture
def gated(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto, "TIMED_DEVICE_TYPES", ("cpu",))
    auto.clear_memory()
    yield tmp_path / "autotune.json"
    auto.clear_memory()


def layer_and_inputs(m=8, k=64, n=32, r=4, dtype=torch.bfloat16):
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, dtype=dtype)
    layer = qlora.quantize_linear(linear, "nf4", 64, True, compute_dtype=dtype)
    layer.support_avx512bf16_for_cpu = False  # else bitsandbytes repacks W in place for its CPU kernel
    base = qlora.base_weight(layer.weight, dtype)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    A = (torch.randn(r, k) / k**0.5).requires_grad_()
    B = (torch.randn(n, r) / r**0.5).requires_grad_()
    return base, layer.bias, x, A, B


def unfused(base, bias, x, A, B):
    return qlora.lora_linear(x, base.dequantized(x.dtype), bias, A, B, 0.5, backend="torch")


def spy(monkeypatch, transform=lambda y: y):
    calls = []
    real = triton_qlora.qlora_linear_2d

    def fused(*args):
        calls.append(1)
        return transform(real(*args))

    monkeypatch.setattr(triton_qlora, "qlora_linear_2d", fused)
    return calls


def test_a_correct_fused_path_passes_the_gate_and_runs(gated, monkeypatch):
    calls = spy(monkeypatch)
    base, bias, x, A, B = layer_and_inputs()
    y = base.lora_linear(x, bias, A, B, 0.5, 0.0, "auto")
    assert len(calls) == 3  # the gate's check and its second run, then the call itself
    (entry,) = auto._memory.values()
    assert entry["backend"] == "triton" and "4bit=nf4/64/nested" in next(iter(auto._memory))
    assert rel_error(y, unfused(base, bias, x, A, B)) <= 2 * tolerance(torch.bfloat16, "cpu")
    base.lora_linear(x, bias, A, B, 0.5, 0.0, "auto")
    assert len(calls) == 4  # decided: no more checks
    assert gated.exists()


@pytest.mark.parametrize("fault", [lambda y: y * 1.5, lambda y: y * float("nan")], ids=["wrong", "nan"])
def test_a_wrong_fused_path_is_rejected_for_the_dequantizing_one(gated, monkeypatch, fault):
    calls = spy(monkeypatch, fault)
    base, bias, x, A, B = layer_and_inputs()
    with pytest.warns(RuntimeWarning, match="backend='triton' is excluded from backend='auto' for 4bit=nf4/64"):
        y = base.lora_linear(x, bias, A, B, 0.5, 0.0, "auto")
    assert len(calls) == 1  # the check only: the call ran the torch path
    assert rel_error(y, unfused(base, bias, x, A, B)) <= tolerance(torch.bfloat16, "cpu")
    (entry,) = auto._memory.values()
    assert entry["backend"] == "torch" and entry["times_ms"]["triton"].startswith(("wrong result: y", "non-finite result: y"))
    assert '"backend": "torch"' in gated.read_text()


def test_on_untimed_devices_the_fused_path_runs_unchecked(monkeypatch):
    calls = spy(monkeypatch)
    base, bias, x, A, B = layer_and_inputs()
    base.lora_linear(x, bias, A, B, 0.5, 0.0, "auto")
    assert len(calls) == 1  # today's behaviour on the CPU: no gate
