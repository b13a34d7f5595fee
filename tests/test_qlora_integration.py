"""QLoRA integration: bitsandbytes ``Linear4bit`` layers in ``FusedLoRALinear`` and in PEFT models
(``patch_peft``), their checks, save/load and the bench providers, against PEFT and the float64
reference over bitsandbytes' dequantized W. The kernels' own numerics are in ``test_qlora.py``."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import poisoned, rel_error, train_losses  # noqa: F401

bnb = pytest.importorskip("bitsandbytes")
triton_qlora = pytest.importorskip("fastlora.ops.triton_qlora")
from qlora_helpers import DEVICE, adapters, bnb_dequantize, fused, quantized  # noqa: E402

import fastlora  # noqa: E402
from fastlora import FusedLoRALinear, patch_peft, qlora  # noqa: E402

pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not triton_qlora.INTERPRET, reason="the 4-bit kernels need CUDA or TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("poisoned"),  # every buffer the kernels write starts as NaN
]


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
    with pytest.raises(ImportError, match=r"need bitsandbytes.*pip install -e '\.\[qlora\]'"):
        qlora.quantize_linear(torch.nn.Linear(8, 8))


def test_import_fastlora_does_not_import_bitsandbytes():
    code = "import sys, fastlora, fastlora.qlora; assert 'bitsandbytes' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

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
