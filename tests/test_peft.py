"""``patch_peft`` on tiny random Llama and GPT-2 models: same outputs, grads and training as PEFT."""

import copy
import re
import warnings

import pytest
import torch
from helpers import backends_on, rel_error, train_losses

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastlora.qlora as qlora  # noqa: E402
from fastlora.peft_integration import patch_peft, unpatch_peft  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_base(arch: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype)


def tiny_peft(arch: str, dtype=torch.float32, **lora_kwargs):
    """A PEFT model whose lora_B is random, so that the low-rank branch matters."""
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    lora_kwargs = {"r": 4, "lora_alpha": 8, "target_modules": targets, "fan_in_fan_out": arch == "gpt2", **lora_kwargs}
    model = peft.get_peft_model(tiny_base(arch, dtype), peft.LoraConfig(**lora_kwargs))
    randomize_lora_B(model)
    return model


def randomize_lora_B(model, seed: int = 1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)


def input_ids(batch: int = 2, seq: int = 16, seed: int = 2):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.fixture
def fused_calls(monkeypatch):
    """The dropout probability of each call that took the fused path."""
    calls, original = [], qlora.lora_linear

    def spy(*args, **kwargs):
        calls.append(kwargs["dropout"])
        return original(*args, **kwargs)

    monkeypatch.setattr(qlora, "lora_linear", spy)
    return calls


def assert_matches(model, ids, ref_logits, ref_grads, tol):
    logits, grads = logits_and_grads(model, ids)
    assert rel_error(logits, ref_logits) <= tol
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert rel_error(grads[name], ref_grads[name]) <= tol, name


@pytest.mark.parametrize("arch, n_layers", [("llama", 14), ("gpt2", 8)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_patch_matches_peft(arch, n_layers, use_rslora, fused_calls):
    model, ids = tiny_peft(arch, use_rslora=use_rslora), input_ids()
    ref_logits, ref_grads = logits_and_grads(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is supported: no warning
        assert patch_peft(model) == n_layers
    assert_matches(model, ids, ref_logits, ref_grads, 1e-5)
    assert len(fused_calls) == n_layers
    assert unpatch_peft(model) == n_layers
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert_matches(model, ids, ref_logits, ref_grads, 1e-5)
    assert len(fused_calls) == n_layers


@pytest.mark.parametrize("backend", [b for b in backends_on("cpu") if b != "torch"])
def test_fused_backend_takes_transposed_conv1d_weight(backend, fused_calls):
    """GPT-2's Conv1D weight [in, out] reaches the fused kernels as a strided transposed view."""
    model, ids = tiny_peft("gpt2"), input_ids(seq=8)
    ref_logits, ref_grads = logits_and_grads(model, ids)
    patch_peft(model, backend=backend)
    assert_matches(model, ids, ref_logits, ref_grads, 1e-5)
    assert len(fused_calls) == 8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp32_adapters_bf16_base(arch, fused_calls):
    """Two bf16 runs of a whole model differ by ~1e-2 from rounding alone, so both are measured
    against the fp32 run of the same weights: fastlora must be about as accurate as PEFT."""
    model, ids = tiny_peft(arch, torch.bfloat16), input_ids()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    truth = logits_and_grads(copy.deepcopy(model).float(), ids)
    peft_run = logits_and_grads(model, ids)
    patch_peft(model)
    fused_run = logits_and_grads(model, ids)
    assert fused_calls

    def errors(run):
        flat = [torch.cat([g[n].float().flatten() for n in sorted(g)]) for g in (run[1], truth[1])]
        return rel_error(run[0], truth[0]), rel_error(*flat)

    for fused_err, peft_err in zip(errors(fused_run), errors(peft_run)):
        assert fused_err <= 1.5 * peft_err + 2e-3


def test_training_curve_matches():
    reference = tiny_peft("gpt2")
    fused = copy.deepcopy(reference)
    patch_peft(fused)
    losses = []
    for model in (reference, fused):
        torch.manual_seed(3)
        losses.append(train_losses(model, (input_ids(seed=step) for step in range(20))))
    assert losses[0][-1] < losses[0][0]  # it trained
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)


def test_save_load_roundtrip(tmp_path):
    model, ids = tiny_peft("llama"), input_ids()
    patch_peft(model)
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_base("llama"), tmp_path)
    assert patch_peft(loaded) == 14
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_states(fused_calls):
    """Merged, disabled and mixed-batch calls run PEFT's forward; ``set_adapter`` switches the fused
    adapter; lora_dropout is passed on in training mode only."""
    model, ids = tiny_peft("llama", lora_dropout=0.5), input_ids()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS))
    randomize_lora_B(model, seed=4)
    model.eval()
    reference = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        reference[name] = model(input_ids=ids).logits
    model.set_adapter("default")
    patch_peft(model)

    def logits():
        return model(input_ids=ids).logits

    torch.testing.assert_close(logits(), reference["default"], rtol=1e-5, atol=1e-5)
    model.set_adapter("other")
    torch.testing.assert_close(logits(), reference["other"], rtol=1e-5, atol=1e-5)
    assert fused_calls == [0.0] * 28

    fused_calls.clear()
    model.merge_adapter()
    torch.testing.assert_close(logits(), reference["other"], rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(), tiny_base("llama")(input_ids=ids).logits)
    mixed = model(input_ids=ids, adapter_names=["default", "other"]).logits
    torch.testing.assert_close(mixed[0], reference["default"][0], rtol=1e-5, atol=1e-5)
    assert not fused_calls
    model.set_adapter("default")
    model.train()
    assert not torch.allclose(logits(), reference["default"])  # dropped out
    assert fused_calls == [0.5] * 14


def test_unsupported_layers_warn_once():
    model = tiny_peft("llama", use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"])
    ids = input_ids()
    expected = model(input_ids=ids).logits
    with pytest.warns(UserWarning) as record:
        assert patch_peft(model) == 4  # DoRA on lora.Linear is fused (issue 19); a DoRA Embedding is not
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 of 5 LoRA layer(s)" in message and "(4 run fused)" in message, message
    # Grouped by reason, with a count and at most three names per reason.
    assert "1 × Embedding layers have no fused path" in message and "embed_tokens" in message, message
    assert sum("forward" in m.__dict__ for m in model.modules()) == 4
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_model_without_peft_lora_layers_is_refused():
    """Not a silent 0: the usual slip is passing the base model, or a fastlora-converted one."""
    import fastlora

    for model in (tiny_base("llama"), fastlora.replace_linear_with_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)))):
        with pytest.raises(ValueError, match="patch_peft found no PEFT LoRA layer in (LlamaForCausalLM|Sequential): pass the model that peft.get_peft_model"):
            patch_peft(model)


def test_backend_is_checked_when_patching():
    model = tiny_peft("llama")
    with pytest.raises(ValueError, match=re.escape("got 'trition' (did you mean 'triton'?)")):
        patch_peft(model, backend="trition")
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.slow  # torch.compile of a Llama: about a minute on a CPU
def test_compiled_patched_llama_has_no_graph_breaks(fused_calls):
    """``torch.compile(fullgraph=True)`` of a whole patched model: fastlora adds no graph break."""
    torch._dynamo.reset()
    model = tiny_peft("llama")
    patch_peft(model)
    ids = input_ids()
    ref_logits, ref_grads = logits_and_grads(model, ids)
    fused_calls.clear()
    model.forward = torch.compile(model.forward, fullgraph=True)
    assert_matches(model, ids, ref_logits, ref_grads, 1e-5)
    assert len(fused_calls) == 2 * len(LLAMA_TARGETS)  # traced through the fused path, every layer


def test_transformers_gradient_checkpointing():
    ids = input_ids()
    model = tiny_peft("llama")
    ref_logits, ref_grads = logits_and_grads(model, ids)
    patch_peft(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert_matches(model, ids, ref_logits, ref_grads, 1e-5)
