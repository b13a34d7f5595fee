"""QLoRA: the fused LoRA linear layer over a 4-bit (NF4/FP4, bitsandbytes layout) base weight.

    forward : y      = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ,   xa = D(x) Aᵀ (fp32, saved for the backward)
    backward: grad_x = gy W + s·D((gy B) A),  grad_A = s·(gy B)ᵀ D(x),  grad_B = s·gyᵀ xa,  grad_b = Σ_m gy

``W [N, K]`` is never materialised in a float dtype: ``_qlora_matmul_kernel`` reads its packed codes
inside the GEMM's K loop and dequantizes each tile in registers, from the bitsandbytes layout that
``_quant4bit`` describes (flat element index ``i = n·K + k``; ``Quant4bit`` holds the tensors), to
the value ``bitsandbytes.functional.dequantize_4bit`` gives, so the tile fed to ``tl.dot`` is the
weight bitsandbytes' own matmul uses. Because the kernel indexes elements by their flat index, any K
and N work, including K not a multiple of QBLOCK and odd ``N·K``.

One kernel serves the forward and ``grad_x``; only the logical orientation of W changes (the flat
index of tile element ``(k, n)`` is ``k·stride_wk + n·stride_wn``):

    forward : a = x [M, K],   w[k, n] = W[n, k]  (stride_wk = 1, stride_wn = K), la = Aᵀ, lb = Bᵀ
    grad_x  : a = gy [M, N],  w[k, n] = W[k, n]  (stride_wk = K, stride_wn = 1), la = B,  lb = A

The low-rank product ``a·la`` rides on the same ``a`` tiles (fp32 accumulator ``acc_t``) and is
recomputed by every column of output tiles: ``R_PAD / BLOCK_N`` more tensor-core work than the base
GEMM (25 % at r = 16 with BLOCK_N = 64, 12.5 % with 128). The dequantization costs more: per W
element and K step, two gathers (packed byte, code) plus the block scale (one gather, three when
nested) once a tile line where K is a multiple of the quant block, else once an element, and ~10
integer/fp32 instructions on the CUDA cores, against BLOCK_M multiply-adds on the tensor cores
(128 for the largest tile): by the H100's peak rates (≈495 T bf16 MAC/s on tensor
cores, ≈60 T instructions/s on CUDA cores) those take about the same time, so the dequant, not the
rank-r recompute, is what a 4-bit GEMM pays over a dense one (an estimate; not yet timed on a GPU).
The dropout mask is the counter-based ``tl.rand(seed, m·K + k) ≥ p`` of the dense Triton backend,
regenerated in the backward. Each element's mask is drawn once a pass: with dropout the forward's
``xa = D(x)Aᵀ`` comes from its own small kernel (``_qlora_low_rank_kernel``, one program a row block
looping over K: M·K draws, x read once more, M·K·2 bytes beside the GEMM's dequantization), which
the GEMM's epilogue then reads (``T_GIVEN``). Drawn inside the GEMM's K loop instead, every column
of output tiles redrew it: M·K·⌈N/BLOCK_N⌉ Philox draws, ~18 ms by instruction count against a
1.3 ms GEMM at M = 8192, K = 4096, N = 14336. The backward draws M·K in grad_x's epilogue (one per
output element) and M·K·⌈R/BLOCK_P⌉ in grad_A's reduction (``_reduce_over_m``, one tile of R for
R ≤ 64).

The two adapter gradients (``s·lhsᵀ·rhs`` over the long M axis) and the bias gradient come from
``_triton_common._reduce_over_m``, the dense backend's deterministic split-M reduction (with its
``COL_SUM`` option for ``Σ_m gy``). Its operands are rank-r and ``[M, N]`` / ``[M, K]`` activations;
W is not involved.

Under ``TRITON_INTERPRET=1`` (the CPU tests) each kernel runs one configuration and bf16 operands are
upcast before ``tl.dot``, whose bf16 form the interpreter gets wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton_common  # _triton_common._empty by attribute: the tests patch it to poison buffers
from ._contract import autograd_pair, fake_grads
from ._device import device_limits
from ._quant4bit import HALF_DTYPES, Quant4bit, code_table
from ._triton_common import (
    _NO_DROPOUT, INTERPRET, INTERPRETER_CONFIGS, _configs, _dot, _Dropout, _dropout, _padded_rank, _precisions,
    _reduce_over_m,
)  # fmt: skip


@triton.jit
def _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, QBLOCK2: tl.constexpr, NESTED: tl.constexpr):
    """fp32 absmax of the quant blocks ``block`` (int64), undoing the nested quantization."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        # Two roundings, as bitsandbytes' dequantize_blockwise then `absmax += offset`.
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // QBLOCK2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize(
    w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, origin, local, mask,
    row_lines, row_mask, col_lines, col_mask,
    PER_ROW: tl.constexpr, PER_COLUMN: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    """fp32 values of the W elements at flat indices ``origin + local`` (0 where ``mask`` is False).

    ``origin`` (int64 scalar) is split into a base aligned to ``QBLOCK`` elements, which moves the
    pointers, and a remainder added to the int32 in-tile offsets ``local``: every per-element index
    is then int32 (int64 ones cost twice the registers; the 64×64 tile spilled). Where each tile
    row (``PER_ROW``) or column (``PER_COLUMN``) lies within one quant block, its scale is loaded
    once a line (in-tile offsets of the lines' first elements ``row_lines`` / ``col_lines``) instead
    of once an element: two gathers an element instead of three (five when nested)."""
    aligned = origin - origin % QBLOCK
    rest = (origin - aligned).to(tl.int32)
    local = local + rest
    packed = tl.load(w_ptr + aligned // 2 + (local >> 1), mask=mask, other=0).to(tl.int32)
    shift = ((local & 1) ^ 1) * 4  # even elements sit in the high nibble
    value = tl.load(code_ptr + ((packed >> shift) & 0xF))  # 16 entries: stays in L1
    first_block = aligned // QBLOCK
    if PER_COLUMN:
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first_block + (col_lines + rest) // QBLOCK,
                             col_mask, QBLOCK2, NESTED)[None, :]  # fmt: skip
    elif PER_ROW:
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first_block + (row_lines + rest) // QBLOCK,
                             row_mask, QBLOCK2, NESTED)[:, None]  # fmt: skip
    else:
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first_block + local // QBLOCK,
                             mask, QBLOCK2, NESTED)  # fmt: skip
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _qlora_matmul_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    la_ptr, lb_ptr, bias_ptr, out_ptr, t_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar, stride_lbr, stride_lbn,
    stride_om, stride_on, stride_tm, stride_tr,
    scaling, dropout_p, dropout_scale, seed,
    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    TRANSPOSED_W: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr, STORE_T: tl.constexpr, T_GIVEN: tl.constexpr,
    R_PAD: tl.constexpr, DROPOUT_OUT: tl.constexpr,
    PRECISION: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP32_ADAPTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped tile order: GROUP_M row blocks share each W column block while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    if WRITE_OUT:
        num_n = tl.cdiv(N, BLOCK_N)
    else:
        num_n = 1
    group_width = GROUP_M * num_n
    first_m = (pid // group_width) * GROUP_M
    group_height = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_height
    pid_n = (pid % group_width) // group_height

    # int64 offsets: M·stride and the flat index n·K + k can pass 2³¹.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    # W's flat index of tile element (k, n): w_origin (int64) + w_local (int32, see _dequantize).
    w_origin = pid_n.to(tl.int64) * BLOCK_N * stride_wn
    w_rows = offs_k * stride_wk
    w_cols = tl.arange(0, BLOCK_N) * stride_wn
    w_local = w_rows[:, None] + w_cols[None, :]
    la_ptrs = la_ptr + offs_k[:, None] * stride_lak + offs_r[None, :] * stride_lar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if WRITE_OUT:
            w = _dequantize(
                w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, w_origin, w_local,
                mask_k[:, None] & mask_n[None, :], w_rows, mask_k, w_cols, mask_n,
                # With K a multiple of QBLOCK, a tile line along W's contiguous axis (the forward's
                # tile columns, grad_x's rows) lies in one quant block when its length divides QBLOCK.
                ROWS_ALIGNED and not TRANSPOSED_W and QBLOCK % BLOCK_N == 0,
                ROWS_ALIGNED and TRANSPOSED_W and QBLOCK % BLOCK_K == 0,
                QBLOCK, QBLOCK2, NESTED,
            )  # fmt: skip
            acc = _dot(a, w.to(a_ptr.dtype.element_ty), acc, PRECISION, UPCAST)
        if not T_GIVEN:  # t = a·la rides on the a tiles (recomputed by each column of output tiles)
            la = tl.load(la_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if FP32_ADAPTERS:
                acc_t = tl.dot(a.to(tl.float32), la, acc_t, input_precision=LOW_RANK_PRECISION)
            else:
                acc_t = _dot(a, la.to(a.dtype), acc_t, PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        w_origin += BLOCK_K * stride_wk
        la_ptrs += BLOCK_K * stride_lak
    if T_GIVEN:  # t = D(a)·la from _qlora_low_rank_kernel (the forward with dropout)
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
        acc_t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)

    if STORE_T:
        if pid_n == 0:
            t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
            tl.store(t_ptrs, acc_t, mask=mask_m[:, None] & mask_r[None, :])
    if WRITE_OUT:
        # Padding columns of t are a·0, NaN where a holds an inf: zero them explicitly.
        acc_t = tl.where(mask_r[None, :], acc_t, 0.0)
        lb_ptrs = lb_ptr + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
        lb = tl.load(lb_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        low_rank = tl.dot(acc_t, lb, input_precision=LOW_RANK_PRECISION)
        if DROPOUT_OUT:  # grad_x's D(·): element (m, k) of grad_x has the forward's counter m·K + k
            keep = tl.rand(seed, offs_m[:, None] * N + offs_n[None, :]) >= dropout_p
            low_rank = tl.where(keep, low_rank * dropout_scale, 0.0)
        acc += scaling * low_rank
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _qlora_low_rank_kernel(
    x_ptr, la_ptr, t_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_lak, stride_lar, stride_tm, stride_tr,
    dropout_p, dropout_scale, seed,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FP32_ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # t [M, R] (fp32) = D(x) · la for one row block: each element of x is read, and its mask drawn
    # (counter m·K + k, as the backward redraws it), once. The products are the GEMM's own (same
    # operand dtypes and precisions), so t is what its K loop would have accumulated.
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    la_ptrs = la_ptr + offs_k[:, None] * stride_lak + offs_r[None, :] * stride_lar
    acc_t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        keep = tl.rand(seed, offs_m[:, None] * K + (k0 + offs_k.to(tl.int64))[None, :]) >= dropout_p
        a = tl.where(keep, a, 0.0)
        la = tl.load(la_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if FP32_ADAPTERS:
            acc_t = tl.dot(a.to(tl.float32), la, acc_t, input_precision=LOW_RANK_PRECISION)
        else:
            acc_t = _dot(a, la.to(a.dtype), acc_t, PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        la_ptrs += BLOCK_K * stride_lak
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, acc_t * dropout_scale, mask=mask_m[:, None] & mask_r[None, :])


# Compiled for sm_90a and sm_80 (bf16 x, nested NF4, fp32 or bf16 adapters, r = 16…256, forward and
# grad_x with dropout): every config kept by ``prune_configs`` has zero spill stack. The dequantized
# W tile is built in registers from per-element gathers (packed byte, code, absmax), which the
# pipeliner stages through shared memory with cp.async (128×128×32 with 8 warps spilled ~1 KiB in
# grad_x, whose dropout draws a random number per output element).
GPU_CONFIGS = _configs(
    [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (128, 64, 64, 8, 2),
        (64, 128, 32, 8, 2),  # sm_90 only, as the next
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
# bytes in grad_x (r = 16 and 64, fp32 adapters) where they had none for sm_90a.
_HOPPER_ONLY = {(64, 128, 32, 8), (64, 64, 32, 4)}
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
    row block dwarfs M; keep the leanest one if none is left."""
    args = {**named_args, **kwargs}
    rank, m_bucket = args["R_PAD"], args["M_BUCKET"]
    a_size, la_size = args["a_ptr"].element_size(), args["la_ptr"].element_size()
    limits = device_limits(args["a_ptr"].device)
    candidates = [c for c in configs if limits.capability >= (9, 0) or _shape(c) not in _HOPPER_ONLY] or configs

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
    return kept or [min(candidates, key=lambda c: (accumulators(c), _shared_bytes(c, a_size, la_size, rank)))]


# Keyed on M's power-of-two bucket so that varying sequence lengths do not re-tune at every batch.
_qlora_matmul = triton.autotune(
    configs=INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "WRITE_OUT", "STORE_T", "T_GIVEN", "DROPOUT_OUT", "QBLOCK", "NESTED", "ROWS_ALIGNED"],
    prune_configs_by={"early_config_prune": prune_configs},
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
    shared-memory budgets, then those whose row block dwarfs M; keep the leanest that fits."""
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
    return kept or [min(fitting, key=lambda c: c.kwargs["BLOCK_M"])]


_qlora_low_rank = triton.autotune(
    configs=LOW_RANK_INTERPRETER_CONFIGS if INTERPRET else LOW_RANK_GPU_CONFIGS,
    key=["M_BUCKET", "K", "R_PAD"],
    prune_configs_by={"early_config_prune": prune_low_rank_configs},
)(_qlora_low_rank_kernel)


def _launch_matmul(a, q: Quant4bit, in_features: int, transpose_w: bool, la, lb, bias, out, t, scaling,
                   t_given: bool = False, out_dropout: _Dropout = _NO_DROPOUT):  # fmt: skip
    """``out = a·w + scaling·t·lb + bias`` with ``w = Wᵀ [K, N]`` (``transpose_w``, the forward) or
    ``w = W`` (``grad_x``), dequantized in-tile. ``t [M, R]`` (fp32) is read where ``t_given``, else
    computed as ``a·la`` in the K loop and stored where not None. ``out`` may be None (only ``t``
    written). ``out_dropout`` drops elements of ``t·lb`` (grad_x's ``D``)."""
    M, K = a.shape
    N = q.out_features if transpose_w else in_features
    stride_wk, stride_wn = (1, in_features) if transpose_w else (in_features, 1)
    R = la.shape[1]
    precision, low_rank_precision = _precisions(a.dtype)
    write_out = out is not None
    out_or_t = out if write_out else t
    t_strides = t.stride() if t is not None else (0, 0)
    nested = q.absmax2 is not None
    # In-tile flat offsets are int32: a tile spans < 256 rows of W plus one quant block.
    if 256 * in_features + q.blocksize >= 2**31:
        raise ValueError(f"in_features={in_features} is too large for the 4-bit kernels (at most {(2**31 - 4096) // 256})")

    def grid(meta):
        num_n = triton.cdiv(N, meta["BLOCK_N"]) if write_out else 1
        return (triton.cdiv(M, meta["BLOCK_M"]) * num_n,)

    with _triton_common.on_device(a.device):
        _qlora_matmul[grid](
            a, q.packed, q.absmax, q.code, q.absmax2 if nested else q.absmax, q.code2 if nested else q.code,
            q.offset if nested else q.code,
            la, lb, bias if bias is not None else out_or_t, out_or_t, t if t is not None else out_or_t,
            M, N, K, R, triton.next_power_of_2(M),
            *a.stride(), stride_wk, stride_wn, *la.stride(), *lb.stride(), *out_or_t.stride(), *t_strides,
            scaling, out_dropout.p, out_dropout.scale, out_dropout.seed,
            QBLOCK=q.blocksize, QBLOCK2=q.blocksize2 if nested else 1, NESTED=nested,
            ROWS_ALIGNED=in_features % q.blocksize == 0, TRANSPOSED_W=transpose_w,
            HAS_BIAS=bias is not None, WRITE_OUT=write_out, STORE_T=t is not None and not t_given, T_GIVEN=t_given,
            R_PAD=_padded_rank(R), DROPOUT_OUT=bool(out_dropout.p), PRECISION=precision,
            LOW_RANK_PRECISION=low_rank_precision, UPCAST=INTERPRET and a.dtype == torch.bfloat16,
            FP32_ADAPTERS=la.dtype == torch.float32 and a.dtype != torch.float32,
        )  # fmt: skip


def _launch_low_rank(x, la, t, dropout: _Dropout) -> None:
    """``t [M, R] = D(x)·la`` in fp32 for ``x [M, K]``, ``la = Aᵀ [K, R]``: each element's mask drawn
    once (``_qlora_low_rank_kernel``), before the GEMM reads ``t``."""
    M, K = x.shape
    R = la.shape[1]
    precision, low_rank_precision = _precisions(x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    with _triton_common.on_device(x.device):
        _qlora_low_rank[grid](
            x, la, t, M, K, R, triton.next_power_of_2(M),
            *x.stride(), *la.stride(), *t.stride(),
            dropout.p, dropout.scale, dropout.seed,
            R_PAD=_padded_rank(R), PRECISION=precision, LOW_RANK_PRECISION=low_rank_precision,
            UPCAST=INTERPRET and x.dtype == torch.bfloat16,
            FP32_ADAPTERS=la.dtype == torch.float32 and x.dtype != torch.float32,
        )  # fmt: skip


def _quant(packed, absmax, code, absmax2, code2, offset, out_features, blocksize, blocksize2) -> Quant4bit:
    return Quant4bit(packed, absmax, code, absmax2, code2, offset, out_features, blocksize, blocksize2)


def qlora_forward(x, packed, absmax, code, absmax2, code2, offset, out_features: int, blocksize: int, blocksize2: int,
                  bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):  # fmt: skip
    """``(y [M, N] in x.dtype, xa [M, R] fp32)`` for ``x [M, K]`` (see the module doc)."""
    q = _quant(packed, absmax, code, absmax2, code2, offset, out_features, blocksize, blocksize2)
    M, K = x.shape
    y = _triton_common._empty((M, out_features), x.dtype, x.device)
    xa = _triton_common._empty((M, lora_A.shape[0]), torch.float32, x.device)
    if M:
        dropout = _dropout(dropout_p, seed)
        if dropout.p:  # xa = D(x)Aᵀ first, each mask drawn once; the GEMM's epilogue reads it
            _launch_low_rank(x, lora_A.t(), xa, dropout)
        _launch_matmul(x, q, K, True, lora_A.t(), lora_B.t(), bias, y, xa, scaling, t_given=bool(dropout.p))
    return y, xa


def qlora_backward(gy, x, xa, packed, absmax, code, absmax2, code2, offset, out_features: int, blocksize: int,
                   blocksize2: int, lora_A, lora_B, scaling: float, dropout_p: float, seed,
                   need_x: bool, need_A: bool, need_B: bool, need_bias: bool):  # fmt: skip
    """``(grad_x, grad_A, grad_B, grad_bias)``, each empty where its ``need_*`` is False."""
    q = _quant(packed, absmax, code, absmax2, code2, offset, out_features, blocksize, blocksize2)
    M, K = x.shape
    dropout = _dropout(dropout_p, seed)
    grad_x = _triton_common._empty(x.shape, x.dtype, x.device) if need_x else x.new_empty((0,))
    g_xa = _triton_common._empty((M, lora_A.shape[0]), torch.float32, x.device) if need_A else None
    if M and (need_x or need_A):
        _launch_matmul(gy, q, K, False, lora_B, lora_A, None, grad_x if need_x else None, g_xa, scaling,
                       out_dropout=dropout)  # fmt: skip
    grad_A = _reduce_over_m(g_xa, x, scaling, lora_A.dtype, rhs_dropout=dropout)[0] if need_A else lora_A.new_empty((0,))
    grad_B, grad_bias = lora_B.new_empty((0,)), gy.new_empty((0,))
    if need_B or need_bias:
        grad_B, col_sums = _reduce_over_m(gy, xa, scaling, lora_B.dtype, col_sum=need_bias)
        grad_bias = col_sums.to(gy.dtype) if need_bias else grad_bias
    return grad_x, grad_A, grad_B, grad_bias


_QUANT_ARGS = (
    "Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, Tensor? offset, "
    "int out_features, int blocksize, int blocksize2"
)
FORWARD_SCHEMA = (
    f"(Tensor x, {_QUANT_ARGS}, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
    "Tensor? seed) -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    f"(Tensor gy, Tensor x, Tensor xa, {_QUANT_ARGS}, Tensor lora_A, Tensor lora_B, float scaling, "
    "float dropout_p, Tensor? seed, bool need_x, bool need_A, bool need_B, bool need_bias) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
forward_op = torch.library.custom_op("fastlora::qlora_forward", qlora_forward, mutates_args=(), schema=FORWARD_SCHEMA)
backward_op = torch.library.custom_op(
    "fastlora::qlora_backward", qlora_backward, mutates_args=(), schema=BACKWARD_SCHEMA
)


@forward_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, blocksize2, bias, lora_A, lora_B,
      scaling, dropout_p, seed):  # fmt: skip
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@backward_op.register_fake
def _(gy, x, xa, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, blocksize2, lora_A, lora_B,
      scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):  # fmt: skip
    return fake_grads(x, lora_A, lora_B, out_features, need_x, need_A, need_B, need_bias)


# Positions in the forward's inputs: x, the nine quant arguments, bias, lora_A, lora_B, scaling, dropout_p, seed.
_X, _BIAS, _A, _B = 0, 10, 11, 12


def _save(ctx, inputs, xa) -> None:
    ctx.save_for_backward(inputs[_X], xa, *inputs[1:7], inputs[_A], inputs[_B])
    ctx.sizes = inputs[7:10]
    ctx.scaling, ctx.dropout_p, ctx.seed = inputs[13:16]


def _grads(ctx, backward, gy) -> tuple:
    x, xa, *quant, lora_A, lora_B = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_bias, need_A, need_B = need[_X], need[_BIAS], need[_A], need[_B]
    # A backward called inside torch.autocast runs under it too; the forward's dtypes must hold.
    with torch.autocast(gy.device.type, enabled=False):
        grad_x, grad_A, grad_B, grad_bias = backward(
            gy, x, xa, *quant, *ctx.sizes, lora_A, lora_B, ctx.scaling, ctx.dropout_p, ctx.seed,
            need_x, need_A, need_B, need_bias,
        )  # fmt: skip
    grads = [None] * 16
    grads[_X], grads[_BIAS] = (grad_x if need_x else None), (grad_bias if need_bias else None)
    grads[_A], grads[_B] = (grad_A if need_A else None), (grad_B if need_B else None)
    return tuple(grads)


# The eager path (QLoRAFunction) skips the ops' Python dispatch; _save and _grads are this family's
# own (16 inputs: the nine quant arguments stand in the dense contract's weight, which has no gradient).
QLoRAFunction = autograd_pair("QLoRAFunction", forward_op, backward_op, qlora_forward, qlora_backward, _save, _grads)


def qlora_linear_2d(x, q: Quant4bit, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed) -> torch.Tensor:
    """``y [M, N]`` for a 2-D ``x [M, K]``, through the ops under ``torch.compile``, else the Function."""
    args = (x, *q, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if torch.compiler.is_compiling():
        return forward_op(*args)[0]
    return QLoRAFunction.apply(*args)


def launch_for_inspection(M, K, N, r, dtype, adapter_dtype, dropout, backward) -> None:
    """Launch the QLoRA kernels on CPU tensors of one problem (NF4, blocksize 64, nested absmax, the
    common QLoRA recipe) exactly as a real call does; ``fastlora inspect`` intercepts the launches.
    Other input dtypes never reach these kernels (``qlora.py`` runs them dequantized): nothing to launch."""
    if dtype not in HALF_DTYPES:
        return
    blocks = triton.cdiv(N * K, 64)
    q = Quant4bit(
        packed=torch.randint(0, 256, (triton.cdiv(N * K, 2), 1), dtype=torch.uint8),
        absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8),
        code=code_table("nf4", "cpu"),
        absmax2=torch.rand(triton.cdiv(blocks, 256)),
        code2=torch.linspace(-1, 1, 256),
        offset=torch.tensor(0.5),
        out_features=N,
        blocksize=64,
        blocksize2=256,
    )
    x = torch.randn(M, K, dtype=dtype)
    lora_A, lora_B = torch.randn(r, K, dtype=adapter_dtype), torch.randn(N, r, dtype=adapter_dtype)
    bias = torch.randn(N, dtype=dtype)
    seed = torch.tensor(7) if dropout else None
    y, xa = qlora_forward(x, *q, bias, lora_A, lora_B, 2.0, dropout, seed)
    if backward:
        qlora_backward(torch.randn_like(y), x, xa, *q, lora_A, lora_B, 2.0, dropout, seed, True, True, True, True)
