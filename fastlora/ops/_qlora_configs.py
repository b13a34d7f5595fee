"""Autotuner configs, per-thread budgets and pruning of the QLoRA kernels (``_qlora_kernels``), and
the autotuned launchers ``_qlora_matmul`` / ``_qlora_low_rank`` that ``triton_qlora`` calls.

Under ``TRITON_INTERPRET=1`` each kernel gets one configuration (the interpreter cannot benchmark).
"""

from __future__ import annotations

import triton

from ._device import arch_rules, device_limits
from ._qlora_kernels import _qlora_low_rank_kernel, _qlora_matmul_kernel
from ._triton_common import INTERPRET, INTERPRETER_CONFIGS, _configs, autotune_bench
from ._triton_compile import drop_spilling


# Compiled for sm_90a and sm_80 (bf16 x, nested NF4, fp32 or bf16 adapters, r = 16…256, forward and
# grad_x with dropout): every config kept by ``prune_configs`` has zero spill stack. The dequantized
# W tile is built in registers from per-element gathers (packed byte, code, absmax), which the
# pipeliner stages through shared memory with cp.async (128×128×32 with 8 warps spilled ~1 KiB in
# grad_x, whose dropout draws a random number per output element).
GPU_CONFIGS = _configs(
    [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (128, 64, 64, 8, 2),
        (64, 128, 32, 8, 2),  # wgmma/tcgen05 only (sm_90, sm_100), as the next
        (64, 64, 32, 4, 2),
        (32, 64, 32, 8, 2),  # r = 256 (fp32 Aᵀ tile: 32 KiB a stage)
        (16, 64, 32, 4, 2),  # decode
    ]
)
# Per-thread budgets, fitted to those compiles: W elements a K step (each costs several gather
# addresses: 64×64×64 with 4 warps, 32 a thread, spilled), and fp32 accumulators (acc, acc_t) plus
# the Aᵀ/B tile (128×64×64, 8 warps: 44 at r = 16 had no stack, 80 at r = 64 spilled 16 bytes).
_MAX_W_PER_THREAD = 16
_MAX_ACC_PER_THREAD = 72
# Compiled for sm_80 (mma.sync keeps more in registers than Hopper's wgmma), these two spilled 8-24
# bytes in grad_x (r = 16 and 64, fp32 adapters) where they had none for sm_90a; none for sm_100a
# (tcgen05) either (r = 16, bf16 and fp32 adapters, with and without dropout: 91-150 registers). So
# they are for the archs whose ``arch_rules().mma`` is not mma.sync (sm_120, consumer Blackwell, is).
_WIDE_MMA_ONLY = {(64, 128, 32, 8), (64, 64, 32, 4)}
_GATHER_BYTES = 6  # staged per W element: packed byte, absmax code byte, nested absmax (fp32)


def _shared_bytes(config, a_size: int, la_size: int, rank: int) -> int:
    """An upper bound on shared memory: pipelined a, W gathers and Aᵀ tiles, plus the fp32 Bᵀ tile
    of the epilogue (compiled sizes were 60-100 % of it)."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * bk * (bm * a_size + bn * _GATHER_BYTES + rank * la_size) + rank * bn * 4


def _shape(c) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps


def prune_configs(configs, named_args, **kwargs):
    """Drop configs that would spill at this rank or overflow the device's shared memory, or whose
    row block dwarfs M (keep the leanest one if none is left), then those whose compiled kernel
    spills (``drop_spilling``)."""
    args = {**named_args, **kwargs}
    rank, m_bucket = args["R_PAD"], args["M_BUCKET"]
    a_size, la_size = args["a_ptr"].element_size(), args["la_ptr"].element_size()
    limits = device_limits(args["a_ptr"].device)
    # (mma.sync archs: sm_80-89 and sm_120, where the census compiled four of these spilling 16-104 B)
    wide_mma = arch_rules(limits.capability).mma != "mma.sync"
    candidates = [c for c in configs if wide_mma or _shape(c) not in _WIDE_MMA_ONLY] or configs

    def accumulators(c):
        bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        return (bm * (bn + rank) + bk * rank) / (32 * c.num_warps)

    def fits(c):
        w_elements = c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] / (32 * c.num_warps)
        return (
            w_elements <= _MAX_W_PER_THREAD
            and accumulators(c) <= _MAX_ACC_PER_THREAD
            and _shared_bytes(c, a_size, la_size, rank) <= limits.max_shared_bytes
        )

    kept = [c for c in candidates if fits(c) and c.kwargs["BLOCK_M"] <= max(16, m_bucket)]
    if not kept:
        return [min(candidates, key=lambda c: (accumulators(c), _shared_bytes(c, a_size, la_size, rank)))]
    # Then what the compiler says (a no-op under the interpreter): configs whose kernel spills go.
    # The budgets leave exceptions: 32×64×32 with 8 warps reading t (T_GIVEN, r = 64, fp32
    # adapters) spilled 8 bytes for sm_90a at 80 registers.
    return drop_spilling(_qlora_matmul_kernel, kept, named_args, **kwargs)


# Keyed on M's power-of-two bucket so that varying sequence lengths do not re-tune at every batch.
_qlora_matmul = triton.autotune(
    configs=INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "WRITE_OUT", "STORE_T", "T_GIVEN", "DROPOUT_OUT", "QBLOCK", "NESTED", "ROWS_ALIGNED",
         "PRECISION", "LOW_RANK_PRECISION", "FP32_ADAPTERS"],
    prune_configs_by={"early_config_prune": prune_configs},
    do_bench=autotune_bench,  # refuses to time inside a CUDA-graph capture
)(_qlora_matmul_kernel)


# The low-rank pass streams x once (memory-bound, plus a Philox draw an element): configs differ in
# rows a program (more programs for bandwidth, fewer re-reads of Aᵀ from L2) and in K step; the
# budgets are those of the GEMM's Aᵀ tile and accumulators.
LOW_RANK_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in (
        (64, 64, 4, 3),
        (32, 64, 4, 3),
        (64, 32, 8, 3),
        (32, 32, 8, 2),  # r = 256 (fp32 Aᵀ tile: 32 KiB a stage)
        (16, 64, 4, 3),  # decode
    )
]
LOW_RANK_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
_MAX_DRAWS_PER_THREAD = 32  # random numbers a K step (the GEMM's 128×64 tile with 8 warps drew 32)


def _low_rank_shared_bytes(config, a_size: int, la_size: int, rank: int) -> int:
    bm, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    return config.num_stages * bk * (bm * a_size + rank * la_size)


def prune_low_rank_configs(configs, named_args, **kwargs):
    """As ``prune_configs``, for ``_qlora_low_rank_kernel``: drop configs over the register or
    shared-memory budgets, then those whose row block dwarfs M (keep the one with the shortest row
    block if none is left), then those whose compiled kernel spills (``drop_spilling``)."""
    args = {**named_args, **kwargs}
    rank, m_bucket = args["R_PAD"], args["M_BUCKET"]
    a_size, la_size = args["x_ptr"].element_size(), args["la_ptr"].element_size()
    limits = device_limits(args["x_ptr"].device)

    def per_thread(c):
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        return (bm * rank + bk * rank) / (32 * c.num_warps), bm * bk / (32 * c.num_warps)

    def fits(c):
        accumulators, draws = per_thread(c)
        return (
            accumulators <= _MAX_ACC_PER_THREAD
            and draws <= _MAX_DRAWS_PER_THREAD
            and _low_rank_shared_bytes(c, a_size, la_size, rank) <= limits.max_shared_bytes
        )

    fitting = [c for c in configs if fits(c)]
    if not fitting:
        return [min(configs, key=lambda c: (per_thread(c), _low_rank_shared_bytes(c, a_size, la_size, rank)))]
    kept = [c for c in fitting if c.kwargs["BLOCK_M"] <= max(16, m_bucket)]
    if not kept:
        return [min(fitting, key=lambda c: c.kwargs["BLOCK_M"])]
    return drop_spilling(_qlora_low_rank_kernel, kept, named_args, **kwargs)


_qlora_low_rank = triton.autotune(
    configs=LOW_RANK_INTERPRETER_CONFIGS if INTERPRET else LOW_RANK_GPU_CONFIGS,
    key=["M_BUCKET", "K", "R_PAD", "PRECISION", "LOW_RANK_PRECISION", "FP32_ADAPTERS"],
    prune_configs_by={"early_config_prune": prune_low_rank_configs},
    do_bench=autotune_bench,
)(_qlora_low_rank_kernel)
