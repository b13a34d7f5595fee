"""The Triton autotuner's config pruning, checked on the CPU (the GPU configs are never timed here).

Every supported problem must keep at least one config that fits the register budget and the
shared memory of the GPU it launches on (``device_limits``, stood in with ``target_limits``): an
empty or overflowing set would fail at launch on the GPU (r = 256 with fp32 adapters overflows
every large tile).
"""

import pytest
import torch

from fastlora.ops._device import KNOWN_LIMITS, arch_rules, target_limits

triton_lora = pytest.importorskip("fastlora.ops.triton_lora")


@pytest.fixture(autouse=True)
def formula_only(monkeypatch):
    """These tests check the formula filter; the compiler's (``drop_spilling``) needs every argument of
    a launch and is checked by tests/test_inspect.py."""
    from fastlora.ops import _triton_lora_configs

    monkeypatch.setattr(_triton_lora_configs, "drop_spilling", lambda kernel, configs, named_args, **kwargs: list(configs))


def named_args(x_dtype, adapter_dtype, m_bucket, block_m_fixed=0):
    return {
        "a_ptr": torch.empty(1, dtype=x_dtype),
        "la_ptr": torch.empty(1, dtype=adapter_dtype),
        "out_ptr": torch.empty(1, dtype=x_dtype),
        "M_BUCKET": m_bucket,
        "BLOCK_M_FIXED": block_m_fixed,
        "PRECISION": "ieee",  # torch's default fp32 matmul precision, as a launch passes it
    }


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (10, 0), (12, 0)], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("r_pad", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("m_bucket", [1, 16, 64, 1024, 16384])
def test_pruning_keeps_configs_that_fit(capability, x_dtype, adapter_dtype, r_pad, m_bucket):
    limits = KNOWN_LIMITS[capability]
    with target_limits(limits):
        kept = triton_lora.prune_gemm_configs(
            triton_lora.GPU_CONFIGS, named_args(x_dtype, adapter_dtype, m_bucket), R_PAD=r_pad
        )
    assert kept
    for c in kept:
        shared = triton_lora._shared_bytes(c, x_dtype.itemsize, adapter_dtype.itemsize, x_dtype.itemsize, r_pad)
        assert shared <= limits.max_shared_bytes, (c, shared)
        registers = c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + r_pad) / (32 * c.num_warps)
        assert registers <= triton_lora._MAX_ACC_REGISTERS, (c, registers)
        assert c.kwargs["BLOCK_M"] <= max(16, m_bucket)


def test_shared_memory_budget_follows_the_gpu():
    # 128x256x64 in 3 stages of bf16 (147 KiB + its store buffer) fits an H100's 227 KiB, not 100 KiB.
    args = named_args(torch.bfloat16, torch.bfloat16, 8192)
    with target_limits(KNOWN_LIMITS[(9, 0)]):
        big = triton_lora.prune_gemm_configs(triton_lora.GPU_CONFIGS, args, R_PAD=16)
    small_gpu = KNOWN_LIMITS[(8, 0)]._replace(max_shared_bytes=100 * 1024)
    with target_limits(small_gpu):
        small = triton_lora.prune_gemm_configs(triton_lora.GPU_CONFIGS, args, R_PAD=16)
    assert any(c.kwargs["BLOCK_N"] == 256 and c.kwargs["BLOCK_M"] == 128 for c in big)
    assert small and not any(c.kwargs["BLOCK_N"] == 256 and c.kwargs["BLOCK_M"] == 128 for c in small)


def test_large_problems_keep_large_tiles_and_drop_decode_tiles():
    with target_limits(KNOWN_LIMITS[(9, 0)]):
        kept = triton_lora.prune_gemm_configs(
            triton_lora.GPU_CONFIGS, named_args(torch.bfloat16, torch.bfloat16, 8192), R_PAD=16
        )
    assert any(c.kwargs["BLOCK_M"] == 128 for c in kept)
    assert all(c.kwargs["BLOCK_M"] >= 64 for c in kept)  # wgmma needs 64 rows a warp group


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (10, 0), (12, 0)], ids=str)
@pytest.mark.parametrize("m", [1, 40, 64, 100, 8192])
@pytest.mark.parametrize("r", [16, 32, 64, 256])
@pytest.mark.parametrize("dropout", [False, True], ids=["p0", "dropout"])
def test_grad_b_partials_fix_the_row_block(capability, m, r, dropout, monkeypatch):
    # The fused grad_B partials are allocated per row block before the launch: every kept config
    # must use exactly that row block.
    monkeypatch.setattr(triton_lora, "INTERPRET", False)  # the GPU's row block, not the interpreter's
    m_bucket = max(1, 1 << (m - 1).bit_length())
    with target_limits(KNOWN_LIMITS[capability]):
        block_m = triton_lora._grad_b_block_m(m, r, torch.device("cpu"), torch.bfloat16, dropout=dropout)
        kept = triton_lora.prune_gemm_configs(
            triton_lora.GRAD_X_CONFIGS, named_args(torch.bfloat16, torch.float32, m_bucket, block_m), R_PAD=r
        )
    assert kept and all(c.kwargs["BLOCK_M"] == block_m for c in kept)


def test_arch_rules_are_per_arch_not_capability_at_least_9():
    hopper, ampere, ada, b200, b300, rtx50, spark = (
        arch_rules(c) for c in [(9, 0), (8, 0), (8, 9), (10, 0), (10, 3), (12, 0), (12, 1)]
    )
    assert hopper.has_wgmma and not b200.has_wgmma and not rtx50.has_wgmma and not ampere.has_wgmma
    assert b200.mma == b300.mma == "tcgen05" and rtx50.mma == spark.mma == ampere.mma == ada.mma == "mma.sync"
    assert hopper.tma and b200.tma and rtx50.tma and not ampere.tma and not ada.tma
    assert hopper.min_rows == b200.min_rows == 64 and rtx50.min_rows == ampere.min_rows == 32
    assert rtx50.max_k_step == ampere.max_k_step == 32 and hopper.max_k_step is None is b200.max_k_step
    # sm_120 is consumer Blackwell: sm_80's register-operand rules, with TMA, and no 128-row grad_x.
    assert rtx50 == ampere._replace(tma=True) and rtx50.small_tiles_when_busy and rtx50.grad_b_rows == (64, 32)
    # Architectures the table does not know (sm_75, sm_110, a future sm_130) get the rules that
    # assume the least: sm_80's, without TMA.
    assert arch_rules((7, 5)) == arch_rules((11, 0)) == arch_rules((13, 0)) == ampere
    assert KNOWN_LIMITS[(12, 0)].max_shared_bytes == 99 * 1024 and KNOWN_LIMITS[(10, 0)].sm_count == 148


def test_every_field_of_every_arch_rule_is_stated():
    # Each arch's rule is spelled out (no field left to a default), and its values are of its kind.
    from fastlora.ops._device import _RULES, ArchRules

    assert set(_RULES) == {8, 9, 10, 12}
    assert not ArchRules._field_defaults
    for major, rules in _RULES.items():
        assert rules.mma in ("mma.sync", "wgmma", "tcgen05"), major
        assert rules.min_rows in (32, 64) and rules.reduce_rows in (32, 64), major
        wide, narrow = rules.grad_b_rows
        assert wide >= narrow and all(rank in (0, 16, 32) for rank in rules.grad_b_wide_ranks), major
        assert rules.grad_b_wide_ranks[True] <= rules.grad_b_wide_ranks[False], major  # dropout: never wider


@pytest.mark.parametrize(
    "capability, rank, dropout, rows",
    [
        # sm_80 / sm_120 (mma.sync): 64 rows up to r = 32, with dropout too; 32 beyond.
        ((8, 0), 16, False, 64), ((8, 0), 32, True, 64), ((8, 0), 64, False, 32),
        ((12, 0), 16, True, 64), ((12, 0), 64, True, 32),
        # sm_90a (wgmma): 128 rows at r ≤ 32, with dropout at r = 16 only (r = 32 spilled 8-120 bytes).
        ((9, 0), 16, False, 128), ((9, 0), 32, False, 128), ((9, 0), 16, True, 128), ((9, 0), 32, True, 64),
        ((9, 0), 64, False, 64),
        # sm_100a (tcgen05): 128 rows without dropout, never with it (every 128-row config spilled 8-112).
        ((10, 0), 16, False, 128), ((10, 0), 32, False, 128), ((10, 0), 16, True, 64), ((10, 0), 32, True, 64),
        ((10, 0), 64, True, 64),
    ],
)  # fmt: skip
def test_grad_b_row_block_is_the_arch_rule(capability, rank, dropout, rows, monkeypatch):
    monkeypatch.setattr(triton_lora, "INTERPRET", False)
    assert arch_rules(capability).grad_b_block(rank, dropout) == rows
    with target_limits(KNOWN_LIMITS[capability]):
        assert triton_lora._grad_b_block_m(8192, rank, torch.device("cpu"), torch.bfloat16, dropout=dropout) == rows


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_sm100_grad_x_with_dropout_keeps_no_128_row_config(adapter_dtype, monkeypatch):
    # The shapes that spilled on sm_100a with dropout (r = 16): 128×64×64/8 warps/4 stages (8 bytes,
    # bf16 adapters; 112 fp32) and 128×64×32/8 warps/4 stages (24 bytes bf16; 64 fp32). Where they
    # compiled clean (sm_100a without dropout, sm_90a with it) the pruner still offers them.
    monkeypatch.setattr(triton_lora, "INTERPRET", False)
    spilled = {(128, 64, 64, 8, 4), (128, 64, 32, 8, 4)}

    def kept_shapes(capability, dropout):
        with target_limits(KNOWN_LIMITS[capability]):
            block_m = triton_lora._grad_b_block_m(8192, 16, torch.device("cpu"), torch.bfloat16, dropout=dropout)
            args = {**named_args(torch.bfloat16, adapter_dtype, 8192, block_m), "PRECISION": "tf32",
                    "DROPOUT": 2 if dropout else 0, "FP32_ADAPTERS": adapter_dtype == torch.float32}  # fmt: skip
            kept = triton_lora.prune_gemm_configs(triton_lora.GRAD_X_CONFIGS, args, R_PAD=16)
        return {(*(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), c.num_warps, c.num_stages) for c in kept}

    on_b200 = kept_shapes((10, 0), dropout=True)
    assert on_b200 and not on_b200 & spilled and all(shape[0] == 64 for shape in on_b200)
    assert spilled <= kept_shapes((10, 0), dropout=False)
    assert spilled <= kept_shapes((9, 0), dropout=True)


@pytest.mark.parametrize(
    "capability, P, Q, precision, dropout, tile",
    [
        # The tile that spilled 24 bytes on sm_100a (grad_A at r = 16: 16×128, 4 warps, 64-row steps)
        # steps by 32 rows there, by 64 on the others.
        ((10, 0), 16, 4096, "tf32", False, (32, 16, 128, 4)),
        ((9, 0), 16, 4096, "tf32", False, (64, 16, 128, 4)),
        ((8, 0), 16, 4096, "tf32", False, (64, 16, 128, 4)),
        ((12, 0), 32, 4096, "tf32", False, (64, 32, 128, 4)),
        # With dropout, 4-warp tiles draw at most 32 random numbers a thread a step: 32 rows everywhere
        # (r = 32 spilled 312-488 bytes with 64-row steps on sm_90a, sm_100a and sm_120).
        ((9, 0), 32, 4096, "tf32", True, (32, 32, 128, 4)),
        ((12, 0), 16, 4096, "tf32", True, (32, 16, 128, 4)),
        ((10, 0), 32, 4096, "tf32", True, (32, 32, 128, 4)),
        # 8-warp tiles (more than 4096 accumulators) keep 64-row steps on every arch, with dropout too.
        ((10, 0), 64, 4096, "tf32", True, (64, 64, 128, 8)),
        ((9, 0), 64, 4096, "tf32", False, (64, 64, 128, 8)),
        # fp32 products on the CUDA cores: 32-row steps, tiles of at most 2048, whatever the arch.
        ((10, 0), 4096, 16, "ieee", True, (32, 128, 16, 4)),
        ((8, 0), 4096, 16, "ieee", False, (32, 128, 16, 4)),
    ],
)  # fmt: skip
def test_reduce_tile_follows_the_arch_rule(capability, P, Q, precision, dropout, tile):
    from fastlora.ops._triton_common import _MAX_REDUCE_DRAWS, _reduce_config

    with target_limits(KNOWN_LIMITS[capability]):
        got = _reduce_config(P, Q, precision, dropout, torch.device("cpu"))
    assert got == tile
    block_m, _, block_q, warps = got
    assert not dropout or block_m * block_q <= _MAX_REDUCE_DRAWS * 32 * warps


@pytest.mark.parametrize("capability", [(10, 0), (12, 0)], ids=str)
def test_blackwell_pruning_follows_its_rules(capability):
    rules = arch_rules(capability)
    with target_limits(KNOWN_LIMITS[capability]):
        kept = triton_lora.prune_gemm_configs(
            triton_lora.GPU_CONFIGS, named_args(torch.bfloat16, torch.bfloat16, 8192), R_PAD=16
        )
        use_tma = triton_lora._use_tma(torch.device("cpu"), torch.empty(64, 64, dtype=torch.bfloat16))
    assert kept and use_tma
    assert all(c.kwargs["BLOCK_M"] >= rules.min_rows for c in kept)
    if capability == (12, 0):  # mma.sync: K steps of 32, and 99 KiB, which 128×256×64/3 stages exceeds
        assert all(c.kwargs["BLOCK_K"] <= 32 for c in kept)
        assert any(c.kwargs["BLOCK_M"] == 32 for c in kept)
    else:
        assert any(c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 256 for c in kept)


def test_use_tma_per_arch():
    t = torch.empty(64, 64, dtype=torch.bfloat16)
    for capability, expected in [((8, 0), False), ((9, 0), True), ((10, 0), True), ((12, 0), True)]:
        with target_limits(KNOWN_LIMITS[capability]):
            assert triton_lora._use_tma(torch.device("cpu"), t) is expected, capability
