"""The Triton autotuner's config pruning, checked on the CPU (the GPU configs are never timed here).

Every supported problem must keep at least one config that fits the register and shared-memory
budgets: an empty or overflowing set would fail at launch on the GPU (r = 256 with fp32 adapters
overflows every large tile).
"""

import pytest
import torch

triton_lora = pytest.importorskip("fastlora.ops.triton_lora")


@pytest.fixture(autouse=True)
def formula_only(monkeypatch):
    """These tests check the formula filter; the compiler's (``drop_spilling``) needs every argument of
    a launch and is checked by tests/test_inspect.py."""
    monkeypatch.setattr(triton_lora, "drop_spilling", lambda kernel, configs, named_args, **kwargs: list(configs))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("r_pad", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("m_bucket", [1, 16, 64, 1024, 16384])
def test_pruning_keeps_configs_that_fit(x_dtype, adapter_dtype, r_pad, m_bucket):
    named_args = {
        "a_ptr": torch.empty(1, dtype=x_dtype),
        "la_ptr": torch.empty(1, dtype=adapter_dtype),
        "M_BUCKET": m_bucket,
    }
    kept = triton_lora.prune_matmul_configs(triton_lora.GPU_CONFIGS, named_args, R_PAD=r_pad)
    assert kept
    for c in kept:
        shared = triton_lora._shared_bytes(c, x_dtype.itemsize, adapter_dtype.itemsize, r_pad)
        assert shared <= triton_lora._MAX_SHARED_BYTES, (c, shared)
        registers = c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + r_pad) / (32 * c.num_warps)
        assert registers <= triton_lora._MAX_ACC_REGISTERS, (c, registers)


def test_large_problems_keep_large_tiles():
    named_args = {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "la_ptr": torch.empty(1, dtype=torch.bfloat16)}
    kept = triton_lora.prune_matmul_configs(triton_lora.GPU_CONFIGS, {**named_args, "M_BUCKET": 8192}, R_PAD=16)
    assert any(c.kwargs["BLOCK_M"] == 128 for c in kept)
