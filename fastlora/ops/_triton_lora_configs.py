"""Autotuner configs of the ``"triton"`` backend's fused GEMM and their pruning, per problem and per
GPU: register and shared-memory budgets (``device_limits``), the row and K-step rules of each
architecture (``_device.arch_rules``), then what the compiler says (``drop_spilling``).
"""

from __future__ import annotations

import torch
import triton

from ._device import arch_rules, device_limits
from ._triton_common import INTERPRET, INTERPRETER_CONFIGS, _configs, autotune_bench
from ._triton_compile import drop_spilling
from ._triton_lora_kernels import DROPOUT_ON_INPUT, _lora_gemm_kernel


GPU_CONFIGS = _configs(
    [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),  # (4 warps: 576 bytes of stack on sm_90a)
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        # K steps of 32 for mma.sync (sm_80-89), which holds a K step's operands in registers.
        (128, 128, 32, 8, 4),
        (64, 128, 32, 8, 4),
        (64, 64, 32, 4, 4),
        # Decode (M ≤ 64, split over K): short rows, long K steps, bandwidth-bound on w.
        (32, 128, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 128, 4, 4),
        (16, 64, 64, 4, 4),  # fp32 x on an A100 (164 KiB)
        # Short K steps and two stages keep the Aᵀ tile of r = 256 (fp32 adapters: 32 KiB a step) in
        # shared memory, where every config above is pruned; 8 warps share its accumulators.
        (64, 64, 32, 8, 2),
        (64, 64, 32, 4, 2),
        (32, 64, 32, 4, 2),
        (16, 64, 32, 4, 2),
        # fp32 inputs at torch's default "highest" precision multiply on the CUDA cores ("ieee"), whose
        # dots hold whole operand tiles in registers: every tile with K steps of 32 or more spilled
        # there (sm_90a, 64×64×32/4 warps: 1.1 KiB), K steps of 16 did not.
        (64, 64, 16, 4, 2),
        (32, 64, 16, 4, 2),
        (32, 32, 16, 4, 2),
    ]
)

# grad_x with the fused grad_B/bias partials holds their operands beside the accumulator. On sm_90a,
# r = 16: 128×256×64/8 warps spilled 216-264 bytes, 128×128×64/8 warps 32-72 (ptxas C7511, serialized
# wgmma), 128×128×32/8 warps 40 with fp32 adapters and dropout; 128×64×64/8 warps none. r = 64: every
# 128-row shape spilled (16-232), 64×64×64/4 warps none. These are the shapes that compiled clean.
# Which row block a launch gets (so which of these it may pick) is each arch's rule:
# ``_device.ArchRules.grad_b_block`` (sm_100a with dropout: 64 rows, every 128-row shape spilled 8-112).
GRAD_X_CONFIGS = _configs(
    [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (128, 64, 64, 8, 4),
        # The bounded wait's fallback made 128×64×64/8 warps spill 32 bytes with fp32 adapters and
        # dropout (sm_90a, r = 16); 128×64×32/8 warps/4 stages compiled clean there (248 registers),
        # so the fixed 128-row block keeps a config the compiler does not reject. (128×64×64, 3 stages: 24.)
        (128, 64, 32, 8, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 64, 32, 8, 2),
        (32, 64, 64, 4, 4),
        (16, 64, 64, 4, 4),
        (64, 64, 32, 4, 2),
        (32, 64, 32, 4, 2),
        (16, 64, 32, 4, 2),
        (32, 64, 16, 4, 2),  # fp32 inputs ("ieee" dots, see GPU_CONFIGS)
        (32, 32, 16, 4, 2),
    ]
)

# Decode: at most this many rows take the split-K path (W is read once whatever M is; the fp32
# partials grow with M: at M = 64 they are 12 % of W's bytes with two splits at N = K = 4096).
_DECODE_MAX_M = 64


def _cuda_core_dots(dtype: torch.dtype, precision: str) -> bool:
    """Whether the main loop's dots run on the CUDA cores: fp32 operands at "ieee" precision."""
    return dtype == torch.float32 and precision == "ieee"


# Accumulator registers a thread may hold (acc and acc_t, fp32) before a config is not worth timing
# (sm_90a: 128×256×64/8 warps at r = 64, 160 by this count, spilled 8 bytes; at r = 16, 136, none);
# less where the main loop also draws a dropout mask or splits fp32 adapters (there the r = 16 one
# spilled 112 bytes).
_MAX_ACC_REGISTERS = 144
_MAX_ACC_REGISTERS_BUSY_LOOP = 128


def _shared_bytes(config, a_size: int, la_size: int, out_size: int, rank: int) -> int:
    """Shared memory of the main loop's pipelined tiles (``a``, ``w`` and ``la``, one set a stage)
    and of the epilogue's half-tile store buffer."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (bk * (bm + bn) * a_size + bk * rank * la_size) + bm * (bn // 2) * out_size


def _acc_registers(config, rank: int) -> float:
    return config.kwargs["BLOCK_M"] * (config.kwargs["BLOCK_N"] + rank) / (32 * config.num_warps)


def prune_gemm_configs(configs, named_args, **kwargs):
    """The configs worth timing for one problem: accumulators that fit the registers, tiles that fit
    the launching GPU's shared memory (``device_limits``), a row block no taller than M needs (or the
    one the fused grad_B partials were allocated for), the leanest config if none is left; then
    those of them whose compiled kernel does not spill (``drop_spilling``)."""
    args = {**named_args, **kwargs}
    rank, m_bucket, fixed_m = args["R_PAD"], args["M_BUCKET"], args["BLOCK_M_FIXED"]
    busy_loop = args.get("DROPOUT", 0) == DROPOUT_ON_INPUT.value or args.get("FP32_ADAPTERS", False)
    max_registers = _MAX_ACC_REGISTERS_BUSY_LOOP if busy_loop else _MAX_ACC_REGISTERS
    a, la, out = args["a_ptr"], args["la_ptr"], args["out_ptr"]
    limits = device_limits(a.device)
    rules = arch_rules(limits.capability)

    def shared(c):
        return _shared_bytes(c, a.element_size(), la.element_size(), out.element_size(), rank)

    # wgmma and tcgen05 need 64 rows (rules.min_rows); mma.sync (sm_80-89, sm_120) and fp32 "ieee"
    # dots (CUDA cores) take 32-row tiles, which keep the busiest loops off the stack there (sm_80,
    # r = 64, fp32 adapters and dropout: every 64-row tile spilled, 112 bytes or more; 32×64×32 none).
    min_rows = 32 if _cuda_core_dots(a.dtype, args["PRECISION"]) else rules.min_rows

    def rows_ok(c):
        # Short row blocks are for decode (M ≤ 64), where wgmma's 64-row minimum cannot be filled anyway.
        bm = c.kwargs["BLOCK_M"]
        if fixed_m:
            return bm == fixed_m
        return bm <= max(16, m_bucket) if m_bucket <= _DECODE_MAX_M else bm >= min_rows

    candidates = [c for c in configs if rows_ok(c)] or configs
    if rules.max_k_step is not None:
        # mma.sync keeps a K step's operands in registers: on sm_80 every K step of 64 spilled (88-984
        # bytes of stack, r = 16), every K step of 32 did not.
        candidates = [c for c in candidates if c.kwargs["BLOCK_K"] <= rules.max_k_step] or candidates
    if rules.small_tiles_when_busy and (busy_loop or rank >= 64):  # sm_80: 64×128, 128×128 spilled 40-120 bytes
        candidates = [c for c in candidates if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or candidates
    kept = [c for c in candidates if _acc_registers(c, rank) <= max_registers and shared(c) <= limits.max_shared_bytes]
    if not kept:
        return [min(candidates, key=lambda c: (shared(c), _acc_registers(c, rank)))]
    # Then what the compiler says: configs whose compiled kernel spills or overflows shared memory go.
    return drop_spilling(_lora_gemm_kernel, kept, named_args, **kwargs)


def _autotuned(configs):
    # Keyed on M's power-of-two bucket (M_BUCKET, an argument only the autotuner reads) rather than on
    # M, so that training on varying sequence lengths does not re-tune at every new batch size.
    return triton.autotune(
        configs=INTERPRETER_CONFIGS if INTERPRET else configs,
        key=["M_BUCKET", "N", "K", "R_PAD", "BLOCK_M_FIXED", "SPLITS", "HAS_BIAS", "WRITE_OUT", "STORE_T",
             "SPLIT_K", "FUSE_GRAD_B", "BIAS_GRAD", "SPLIT_XA", "USE_TMA", "W_TRANS", "DROPOUT",
             "HAS_COL_SCALE", "PRECISION", "LOW_RANK_PRECISION", "FP32_ADAPTERS"],
        # (The precisions: fp32 "ieee" products run on the CUDA cores, where the pruner keeps other
        # tiles than for "tf32"; a config tuned under one must not serve the other.)
        prune_configs_by={"early_config_prune": prune_gemm_configs},
        do_bench=autotune_bench,  # refuses to time inside a CUDA-graph capture
    )(_lora_gemm_kernel)  # fmt: skip
