"""The ``"triton"`` backend: fused LoRA forward and backward kernels.

``_lora_gemm_kernel`` is one persistent kernel (a program per SM walking output tiles) for three jobs:

    forward : a = x [M, K],  w = Wᵀ, la = Aᵀ, lb = Bᵀ  →  out = y,      t = D(x) Aᵀ  (saved for backward)
    grad_x  : a = gy [M, N], w = W,  la = B,  lb = A   →  out = grad_x, t = gy B     (feeds grad_A)
    decode  : the forward split over K (M ≤ 64): fp32 partials that ``_split_k_reduce_kernel`` sums

computing ``out = a·w + scaling·D(t)·lb + bias`` with ``t = a·la`` (fp32, ``R_PAD`` columns).

``t`` once per row block, not once per output tile: the first ``num_m`` tile ids are the *producer*
tiles (column block 0 of every row block), which accumulate ``t`` beside ``a·w`` in their K loop,
store it and release a per-row-block flag; every other (*consumer*) tile runs its K loop on ``a·w``
alone and waits on its row block's flag only before its epilogue, then reads ``t`` [BLOCK_M, R_PAD].
The flags live in a workspace kept per thread and stream (``_flag_workspace``) that every launch
leaves zeroed: the last of a row block's tiles to be done with its flag resets it (``_arrive``), so a
call needs no memset and an autotuner rerun with the same buffer waits again.
A program reaches a wait only after all of its own producer tiles (they come first in its sequence),
so the wait succeeds while every program is resident (grid ≤ SM count). It is bounded all the same
(``_SPIN_LIMIT`` checks): a consumer that times out computes its row block's ``t`` itself with the
producer's own K loop (``_recompute_t``), so progress never depends on residency (the interpreter,
which runs programs one after another, takes this path for every consumer whose producer comes in
a later program). The flags are the only atomics: the arithmetic has none, and a tile's value does
not depend on which program computes it (deterministic).
The epilogue adds the low-rank term straight into the accumulator, ``acc = tl.dot(s·t, lb, acc)``,
on two ``BLOCK_N/2`` halves of the tile (fewer live registers), then the bias, and stores once.

Operands: where the architecture has TMA (``_device.arch_rules``: sm_90, sm_100, sm_120), with 2-D
row-major operands whose base and row strides are 16-byte aligned, ``a``, ``w`` and ``out`` go
through tensor descriptors (TMA loads/stores); otherwise (sm_80-89, strided or unaligned inputs) the
same source loads through pointers (cp.async on sm_80+). ``w`` is
always read in its stored layout ``W [N, K]``; ``W_TRANS`` says the forward reads it transposed.

grad_x also yields ``grad_B = scaling·gyᵀ xa`` and the bias gradient ``Σ_m gy`` while it streams
``gy`` (``FUSE_GRAD_B``): the K steps of row block ``pid_m`` are dealt out among its consumer tiles
(a grad_B-only tile is added where the grid has a single column), and the tile owning step ``k``
writes ``gy[rows, k]ᵀ·xa[rows]`` and ``Σ_rows gy[rows, k]`` as fp32 partials ``[num_m, N, R]`` /
``[num_m, N]`` that ``torch.sum`` adds over row blocks (``num_m`` fixed before the launch). ``grad_A =
scaling·(gy B)ᵀ D(x)`` is ``_lora_reduce_kernel``: M split across programs, fp32 partials summed in
order. So ``gy`` and ``x`` are each read once by the backward; nothing is accumulated with atomics.

LoRA dropout (``D``) never stores a mask: each element's keep bit is ``tl.rand(seed, m·K + k) ≥ p``,
a counter-based draw that the backward regenerates. Its sites are ``DROPOUT_ON_INPUT`` (the forward's
``a`` tiles that feed ``t``) and ``DROPOUT_ON_LOW_RANK`` (grad_x's low-rank term: ``D`` is elementwise,
so ``D(x)·Aᵀ`` transposes to ``D(g·A)``); ``grad_A`` applies it to the ``x`` tiles of its reduction.

Precision: fp16/bf16 tiles go to the tensor cores with fp32 accumulation. With fp32 adapters on a
half base (PEFT's default) the fp32 operand of ``a·la`` is split in two of ``a``'s dtype (``hi`` and
the remainder ``lo``: 16 significant bits for bf16, 22 for fp16, TF32 keeps 11), as PEFT runs that
branch in fp32: rounding the adapters to bf16 alone gave 1.5e-2 relative error in ``grad_B`` on a
fuzzed r=1 case. grad_B's ``gyᵀ·xa`` splits ``xa`` the same way. ``t`` stays fp32, so an fp16 input
whose ``x Aᵀ`` exceeds fp16's range is still right; the epilogue's products with ``t`` run in fp32
(TF32 on the tensor cores, whose 11 significant bits hold fp16/bf16 operands exactly). fp32 inputs
use exact fp32 products unless ``torch.set_float32_matmul_precision`` allows TF32.

Under ``TRITON_INTERPRET=1`` (the CPU test suite) each kernel runs one fixed configuration, bf16
operands are upcast to fp32 before ``tl.dot`` because the interpreter's bf16 dot is wrong, and the
fp32 operands of every "tf32" dot are rounded to TF32 first, there and on the GPU (``_dot``): the
tensor cores would truncate them, which exceeds the TF32 tolerance; rounded, the interpreter's
exact product is the GPU's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton_common  # _triton_common._empty by attribute: the tests patch it to poison buffers
from ._contract import register_backend
from ._device import arch_rules, device_limits
from ._triton_common import (
    INTERPRET, INTERPRETER_CONFIGS, _configs, _dot, _Dropout, _dropout, _flag_dummy, _flag_workspace, _padded_rank,
    _precisions, _reduce_over_m, on_device,
)  # fmt: skip
from ._triton_compile import drop_spilling

# Where LoRA dropout applies (csrc/lora_kernels.cuh: DropoutSite::kA, kLowRank).
NO_DROPOUT = tl.constexpr(0)
DROPOUT_ON_INPUT = tl.constexpr(1)
DROPOUT_ON_LOW_RANK = tl.constexpr(2)


@triton.jit
def _tile_coords(tile, num_m, num_n, SPLITS, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n, split)`` of a tile id: first the producers (``pid_n = 0``) of every row block
    (and K split), then the other tiles in grouped order (GROUP_M row blocks share each ``w`` column
    block while it is in L2)."""
    split = tile % SPLITS
    tile = tile // SPLITS
    producers = num_m
    t = tl.maximum(tile - producers, 0)
    cols = tl.maximum(num_n - 1, 1)
    group_width = GROUP_M * cols
    first_m = (t // group_width) * GROUP_M
    group_height = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = tl.where(tile < producers, tile, first_m + (t % group_width) % group_height)
    pid_n = tl.where(tile < producers, 0, 1 + (t % group_width) // group_height)
    return pid_m, pid_n, split


@triton.jit
def _k_loop(
    a_src, w_src, la_ptr, xa_hi, xa_lo, xa_unscale, gb_ws_ptr, bias_ws_ptr,
    off_m, off_n, pid_m, k_lo, k_hi, gb_lo, gb_hi, M, N, K, R,
    stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar,
    stride_gbm, stride_gbk, stride_bwm,
    dropout_p, seed, row0,
    LOW_RANK: tl.constexpr, WRITE_OUT: tl.constexpr, FUSE_GRAD_B: tl.constexpr, BIAS_GRAD: tl.constexpr,
    SPLIT_XA: tl.constexpr, USE_TMA: tl.constexpr, W_TRANS: tl.constexpr, R_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP32_ADAPTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``(a·w, a·la)`` over K steps ``[k_lo, k_hi)`` of one tile (``a·la`` only if ``LOW_RANK``); with
    ``FUSE_GRAD_B`` the steps in ``[gb_lo, gb_hi)`` also write their grad_B / bias partials: for
    ``SPLIT_XA`` (a half ``a``) ``aᵀ·xa`` is ``(aᵀ·xa_hi + aᵀ·xa_lo)·xa_unscale``, two products on the
    tensor cores straight from the ``a`` tile in shared memory, about 16 (bf16) / 22 (fp16) significant
    bits of ``xa`` (TF32 keeps 11); converting the ``a`` tile to fp32 in registers instead spilled
    (sm_90a, 128×256: 192 bytes of stack)."""
    offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_n = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if FUSE_GRAD_B and BIAS_GRAD and SPLIT_XA:
        # Σ_rows a as a product with a column of ones (column 0 of 16: tl.dot's narrowest operand).
        ones = tl.where((tl.arange(0, 16) == 0)[None, :] & mask_m[:, None], 1.0, 0.0).to(xa_hi.dtype)
    for step in range(k_lo, k_hi):
        k0 = step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if USE_TMA:
            a = a_src.load([off_m, k0])
        else:
            a_ptrs = a_src + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        if WRITE_OUT:
            if USE_TMA:
                if W_TRANS:
                    w = tl.trans(w_src.load([off_n, k0]))
                else:
                    w = w_src.load([k0, off_n])
            else:
                w_ptrs = w_src + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
                w = tl.load(w_ptrs, mask=(offs_k < K)[:, None] & (offs_n < N)[None, :], other=0.0)
            acc = _dot(a, w, acc, PRECISION, UPCAST)
        if LOW_RANK:
            la_ptrs = la_ptr + offs_k[:, None] * stride_lak + offs_r[None, :] * stride_lar
            la = tl.load(la_ptrs, mask=(offs_k < K)[:, None] & (offs_r < R)[None, :], other=0.0)
            a_t = a
            if DROPOUT == DROPOUT_ON_INPUT:
                keep = tl.rand(seed, (row0 + offs_m)[:, None] * K + offs_k[None, :]) >= dropout_p
                a_t = tl.where(keep, a, 0.0)
            if FP32_ADAPTERS:
                # la = hi + lo in a's dtype: two products of the a tile as it is (an fp32 copy of the
                # a tile in registers for a TF32 product spilled on sm_90a and sm_80).
                la_hi = la.to(a.dtype)
                la_lo = (la - la_hi.to(tl.float32)).to(a.dtype)
                acc_t = _dot(a_t, la_hi, acc_t, PRECISION, UPCAST)
                acc_t = _dot(a_t, la_lo, acc_t, PRECISION, UPCAST)
            else:
                acc_t = _dot(a_t, la.to(a.dtype), acc_t, PRECISION, UPCAST)
        if FUSE_GRAD_B:
            if (step >= gb_lo) & (step < gb_hi):
                # grad_B rows k of this row block: gy[rows, k]ᵀ·xa[rows], and Σ_rows gy[rows, k].
                a_tr = tl.trans(a)
                if SPLIT_XA:
                    part = _dot(a_tr, xa_hi, tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32), PRECISION, UPCAST)
                    part = _dot(a_tr, xa_lo, part, PRECISION, UPCAST) * xa_unscale[None, :]
                else:
                    part = _dot(a_tr, xa_hi, None, LOW_RANK_PRECISION, False)
                gb_ptrs = gb_ws_ptr + pid_m * stride_gbm + offs_k[:, None] * stride_gbk + offs_r[None, :]
                tl.store(gb_ptrs, part, mask=(offs_k < K)[:, None] & (offs_r < R)[None, :])
                if BIAS_GRAD:
                    if SPLIT_XA:
                        sums = _dot(a_tr, ones, tl.zeros((BLOCK_K, 16), dtype=tl.float32), PRECISION, UPCAST)
                        sums = tl.sum(sums, axis=1)
                    else:
                        sums = tl.sum(a, axis=0)
                    tl.store(bias_ws_ptr + pid_m * stride_bwm + offs_k, sums, mask=offs_k < K)
    return acc, acc_t


@triton.jit
def _epilogue_half(
    acc, t, lb_ptr, bias_ptr, out_dst, off_m, off_n, M, N, R,
    stride_lbr, stride_lbn, stride_om, stride_on, dropout_p, seed, row0,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, R_PAD: tl.constexpr,
    LOW_RANK_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HALF_N: tl.constexpr,
):  # fmt: skip
    """Store ``acc + t·lb (+ bias)`` for output columns ``[off_n, off_n + HALF_N)``; ``t`` carries the
    scaling (and the dropout scale of ``DROPOUT_ON_LOW_RANK``)."""
    offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_n = off_n.to(tl.int64) + tl.arange(0, HALF_N)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < N
    lb_ptrs = lb_ptr + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
    lb = tl.load(lb_ptrs, mask=(offs_r < R)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    if DROPOUT == DROPOUT_ON_LOW_RANK:
        keep = tl.rand(seed, (row0 + offs_m)[:, None] * N + offs_n[None, :]) >= dropout_p
        acc += tl.where(keep, _dot(t, lb, None, LOW_RANK_PRECISION, False), 0.0)
    else:
        acc = _dot(t, lb, acc, LOW_RANK_PRECISION, False)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if USE_TMA:
        out_dst.store([off_m, off_n], acc.to(out_dst.dtype))
    else:
        out_ptrs = out_dst + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_dst.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def _finish_t(acc_t, dropout_scale, mask_r, DROPOUT: tl.constexpr):
    """``t`` as stored: the forward's dropout scale applied, and the padding columns (``a·0``, NaN
    where ``a`` holds an inf) zeroed explicitly."""
    if DROPOUT == DROPOUT_ON_INPUT:
        acc_t *= dropout_scale
    return tl.where(mask_r[None, :], acc_t, 0.0)


@triton.jit
def _recompute_t(
    a_src, w_src, la_ptr, gb_ws_ptr, bias_ws_ptr, off_m, off_n, pid_m, k_lo, k_hi, M, N, K, R,
    stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar,
    dropout_p, dropout_scale, seed, row0,
    USE_TMA: tl.constexpr, W_TRANS: tl.constexpr, R_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP32_ADAPTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A consumer's fallback when its wait timed out: the row block's ``t = D(a)·la`` by the producer's
    own K loop (the same steps, dots, dropout draws and fp32-adapter split, without ``a·w``), so the
    two agree to the bit where the dots are the same instructions."""
    zeros = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    _, acc_t = _k_loop(
        a_src, w_src, la_ptr, zeros, zeros, tl.zeros((R_PAD,), dtype=tl.float32), gb_ws_ptr, bias_ws_ptr,
        off_m, off_n, pid_m, k_lo, k_hi, 0, 0, M, N, K, R,
        stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar, 0, 0, 0,
        dropout_p, seed, row0,
        True, False, False, False, False, USE_TMA, W_TRANS, R_PAD, DROPOUT,
        PRECISION, LOW_RANK_PRECISION, UPCAST, FP32_ADAPTERS, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    return _finish_t(acc_t, dropout_scale, tl.arange(0, R_PAD) < R, DROPOUT)


@triton.jit
def _arrive(flags_ptr, pid_m, participants):
    """One of the ``participants`` tiles of row block ``pid_m`` is done with its flag pair
    ``flags[2·pid_m]`` (t published) / ``flags[2·pid_m + 1]`` (tiles done). The last one resets both to
    0, so that every launch leaves the workspace zeroed: the next call needs no memset, and an
    autotuner rerun with the same buffer waits again (a flag left set would let its consumers read
    ``t`` before this launch's producer wrote it)."""
    done = tl.atomic_add(flags_ptr + 2 * pid_m + 1, 1, sem="acq_rel")
    if done == participants - 1:  # everyone else has read the flag: nobody reads it again this launch
        tl.atomic_xchg(flags_ptr + 2 * pid_m, 0, sem="relaxed")
        tl.atomic_xchg(flags_ptr + 2 * pid_m + 1, 0, sem="relaxed")


@triton.jit
def _lora_gemm_kernel(
    a_ptr, w_ptr, la_ptr, lb_ptr, bias_ptr, out_ptr, t_ptr, flags_ptr, xa_ptr, gb_ws_ptr, bias_ws_ptr,
    M, N, K, R, M_BUCKET, BLOCK_M_FIXED, SPLITS, row0,
    stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar, stride_lbr, stride_lbn,
    stride_om, stride_on, stride_os, stride_tm, stride_tr, stride_ts, stride_xam, stride_xar,
    stride_gbm, stride_gbk, stride_bwm,
    scaling, dropout_p, dropout_scale, seed, spin_limit,
    HAS_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr, STORE_T: tl.constexpr, SPLIT_K: tl.constexpr,
    FUSE_GRAD_B: tl.constexpr, BIAS_GRAD: tl.constexpr, SPLIT_XA: tl.constexpr, USE_TMA: tl.constexpr,
    W_TRANS: tl.constexpr, R_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP32_ADAPTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    HALF_N: tl.constexpr = BLOCK_N // 2
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N) if WRITE_OUT else 1
    out_cols = num_n  # the producer and consumers of a row block's t: its output tiles
    if FUSE_GRAD_B and STORE_T:
        # grad_B is the consumers' work (a producer's loop holding both spilled): one at least a row block.
        num_n = tl.maximum(num_n, 2)
    k_steps = tl.cdiv(K, BLOCK_K)
    split_steps = tl.cdiv(k_steps, SPLITS)
    num_tiles = num_m * num_n * SPLITS
    if USE_TMA:
        a_src = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        if W_TRANS:
            w_src = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
        else:
            w_src = tl.make_tensor_descriptor(w_ptr, [K, N], [stride_wk, 1], [BLOCK_K, BLOCK_N])
        if SPLIT_K:
            out_dst = out_ptr
        else:
            out_dst = tl.make_tensor_descriptor(out_ptr, [M, N], [stride_om, 1], [BLOCK_M, HALF_N])
    else:
        a_src = a_ptr
        w_src = w_ptr
        out_dst = out_ptr
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R

    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n, split = _tile_coords(tile, num_m, num_n, SPLITS, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        k_lo = split * split_steps
        k_hi = tl.minimum(k_lo + split_steps, k_steps)
        xa_hi = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        xa_lo = xa_hi
        xa_unscale = tl.zeros((R_PAD,), dtype=tl.float32)
        gb_lo = 0
        gb_hi = 0
        if FUSE_GRAD_B:
            xa_hi = tl.load(
                xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )
            if SPLIT_XA:
                # xa = (hi + lo)·2^e per column, hi and lo in a's dtype: each column scaled by a power of
                # two into [-1, 1] first (exact), so that an fp16 hi cannot overflow.
                col_max = tl.max(tl.abs(xa_hi), axis=0)
                exponent = tl.where(col_max > 0, tl.ceil(tl.log2(tl.maximum(col_max, 1e-30))), 0.0)
                xa_unscale = tl.exp2(exponent)
                scaled = xa_hi * tl.exp2(-exponent)[None, :]
                xa_hi = scaled.to(a_ptr.dtype.element_ty)
                xa_lo = (scaled - xa_hi.to(tl.float32)).to(a_ptr.dtype.element_ty)
            gb_cols = num_n - 1 if STORE_T else num_n
            steps_per_col = tl.cdiv(k_steps, gb_cols)
            gb_lo = (pid_n - 1 if STORE_T else pid_n) * steps_per_col
            gb_hi = gb_lo + steps_per_col
        t_ptrs = t_ptr + split * stride_ts + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
        if STORE_T and pid_n == 0:
            acc, acc_t = _k_loop(
                a_src, w_src, la_ptr, xa_hi, xa_lo, xa_unscale, gb_ws_ptr, bias_ws_ptr,
                off_m, off_n, pid_m, k_lo, k_hi, gb_lo, gb_hi, M, N, K, R,
                stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar, stride_gbm, stride_gbk, stride_bwm,
                dropout_p, seed, row0,
                True, WRITE_OUT, False, BIAS_GRAD, SPLIT_XA, USE_TMA, W_TRANS, R_PAD, DROPOUT,
                PRECISION, LOW_RANK_PRECISION, UPCAST, FP32_ADAPTERS, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            acc_t = _finish_t(acc_t, dropout_scale, mask_r, DROPOUT)
            tl.store(t_ptrs, acc_t, mask=mask_m[:, None] & mask_r[None, :])
            if WRITE_OUT and not SPLIT_K:
                if out_cols > 1:
                    # Publish t to this row block's consumers: every thread's stores, then the release.
                    tl.debug_barrier()
                    tl.atomic_xchg(flags_ptr + 2 * pid_m, 1, sem="release")
                    _arrive(flags_ptr, pid_m, out_cols)
        else:
            acc, acc_t = _k_loop(
                a_src, w_src, la_ptr, xa_hi, xa_lo, xa_unscale, gb_ws_ptr, bias_ws_ptr,
                off_m, off_n, pid_m, k_lo, k_hi, gb_lo, gb_hi, M, N, K, R,
                stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar, stride_gbm, stride_gbk, stride_bwm,
                dropout_p, seed, row0,
                False, WRITE_OUT, FUSE_GRAD_B, BIAS_GRAD, SPLIT_XA, USE_TMA, W_TRANS, R_PAD, DROPOUT,
                PRECISION, LOW_RANK_PRECISION, UPCAST, FP32_ADAPTERS, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            if WRITE_OUT and STORE_T and not SPLIT_K and off_n < N:
                # A bounded wait: progress must not depend on the producer's program being resident
                # (MPS SM limits, green contexts, a second such kernel on another stream).
                ready = tl.atomic_cas(flags_ptr + 2 * pid_m, 1, 1, sem="acquire")
                spins = 0
                while (ready != 1) & (spins < spin_limit):
                    ready = tl.atomic_cas(flags_ptr + 2 * pid_m, 1, 1, sem="acquire")
                    spins += 1
                if ready == 1:
                    # .cg: read t from L2, where the producer's stores are, not from a stale L1 line.
                    acc_t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0, cache_modifier=".cg")
                else:  # timed out: this row block's t from a itself, as its producer computes it
                    acc_t = _recompute_t(
                        a_src, w_src, la_ptr, gb_ws_ptr, bias_ws_ptr, off_m, off_n, pid_m, k_lo, k_hi, M, N, K, R,
                        stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar,
                        dropout_p, dropout_scale, seed, row0,
                        USE_TMA, W_TRANS, R_PAD, DROPOUT, PRECISION, LOW_RANK_PRECISION, UPCAST, FP32_ADAPTERS,
                        BLOCK_M, BLOCK_N, BLOCK_K,
                    )  # fmt: skip
                _arrive(flags_ptr, pid_m, out_cols)

        if WRITE_OUT and off_n < N:  # (a grad_B-only tile when num_n was raised to 2 lies beyond N)
            if SPLIT_K:
                # Decode: an fp32 partial of a·w; _split_k_reduce_kernel adds the splits and the rest.
                offs_n = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
                out_ptrs = out_dst + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
                tl.store(out_ptrs, acc, mask=mask_m[:, None] & (offs_n < N)[None, :])
            else:
                t = acc_t * scaling
                if DROPOUT == DROPOUT_ON_LOW_RANK:
                    t *= dropout_scale
                # Epilogue on two BLOCK_N/2 halves: half the live low-rank/bias registers of a whole tile.
                acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1)))
                _epilogue_half(
                    acc0, t, lb_ptr, bias_ptr, out_dst, off_m, off_n, M, N, R,
                    stride_lbr, stride_lbn, stride_om, stride_on, dropout_p, seed, row0,
                    HAS_BIAS, DROPOUT, USE_TMA, R_PAD, LOW_RANK_PRECISION, BLOCK_M, HALF_N,
                )  # fmt: skip
                _epilogue_half(
                    acc1, t, lb_ptr, bias_ptr, out_dst, off_m, off_n + HALF_N, M, N, R,
                    stride_lbr, stride_lbn, stride_om, stride_on, dropout_p, seed, row0,
                    HAS_BIAS, DROPOUT, USE_TMA, R_PAD, LOW_RANK_PRECISION, BLOCK_M, HALF_N,
                )  # fmt: skip


@triton.jit
def _split_k_reduce_kernel(
    part_ptr, t_part_ptr, lb_ptr, bias_ptr, out_ptr, t_ptr,
    M, N, R, SPLITS,
    stride_lbr, stride_lbn, stride_om, stride_on, stride_tm, stride_tr,
    scaling,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Decode's second pass: ``out = Σ_s part[s] + scaling·t·lb + bias`` and ``t = Σ_s t_part[s]``,
    for contiguous fp32 partials ``part [S, M, N]``, ``t_part [S, M, R]``, summed in split order."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_mn = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    mask_mr = (offs_m < M)[:, None] & (offs_r < R)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask_mn, other=0.0)
        t += tl.load(t_part_ptr + (s * M + offs_m[:, None]) * R + offs_r[None, :], mask=mask_mr, other=0.0)
    if pid_n == 0:
        tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr, t, mask=mask_mr)
    lb_ptrs = lb_ptr + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
    lb = tl.load(lb_ptrs, mask=(offs_r < R)[:, None] & (offs_n < N)[None, :], other=0.0).to(tl.float32)
    acc = _dot(t * scaling, lb, acc, LOW_RANK_PRECISION, False)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_mn)


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
GRAD_X_CONFIGS = _configs(
    [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (128, 64, 64, 8, 4),
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

# Bytes of fused grad_B partials one launch of the gy pass may write (see triton_backward), unless
# that leaves it fewer row blocks than this (very wide layers at high rank).
_MAX_PARTIAL_BYTES = 16 << 20
_MIN_PARTIAL_BLOCKS = 16

# Checks of its flag a consumer makes before it computes its row block's t itself. At about 0.5-1 µs
# an atomic round trip to L2, 1024 are 0.5-1 ms: over ten times a producer tile's K loop at LLM
# shapes (a consumer reaches its wait after its own K loop, its producer started no later), so a
# resident producer is waited for; a timeout costs the consumer one K loop of a·la (R_PAD/BLOCK_N
# of its tile's work), never a hang. Under the interpreter a wait that fails once cannot succeed
# (the producer's program runs later): two checks, which still run the loop.
_SPIN_LIMIT = 2 if INTERPRET else 1024

# Decode: at most this many rows take the split-K path (W is read once whatever M is; the fp32
# partials grow with M: at M = 64 they are 12 % of W's bytes with two splits at N = K = 4096).
_DECODE_MAX_M = 64


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
             "SPLIT_K", "FUSE_GRAD_B", "BIAS_GRAD", "SPLIT_XA", "USE_TMA", "W_TRANS", "DROPOUT"],
        prune_configs_by={"early_config_prune": prune_gemm_configs},
    )(_lora_gemm_kernel)  # fmt: skip


_lora_gemm = _autotuned(GPU_CONFIGS)
_lora_gemm_grad_x = _autotuned(GRAD_X_CONFIGS)  # with FUSE_GRAD_B


def _tma_ready(t: torch.Tensor | None) -> bool:
    """Can a tensor descriptor address ``t``: 2-D, unit last stride, 16-byte aligned base and rows."""
    if t is None:
        return True
    size = t.element_size()
    return (
        t.dim() == 2
        and t.stride(1) == 1
        and t.data_ptr() % 16 == 0
        and (t.stride(0) * size) % 16 == 0
        and t.stride(0) >= t.shape[1]
    )


def _use_tma(device: torch.device, *operands) -> bool:
    """TMA where the architecture has it (``arch_rules``: sm_90, sm_100, sm_120) and every descriptor
    operand allows it; pointer loads otherwise. (The scratch allocator that device-side descriptors
    need is set per launch by ``on_device``.)"""
    return arch_rules(device_limits(device).capability).tma and all(_tma_ready(t) for t in operands)


def _decode_splits(device: torch.device, M: int, N: int, K: int) -> int:
    """K splits that give every SM a share of w when the output alone has too few tiles (counting
    64-wide column blocks), with at least 512 columns of K a split."""
    tiles = triton.cdiv(N, 64) * triton.cdiv(M, 64)
    return max(1, min(device_limits(device).sm_count // tiles, K // 512, 16))


def _grid(num_tiles, device: torch.device):
    """Persistent grid: one program per SM at most. (Under the interpreter, programs run one after
    another: a consumer whose producer is in a later program times out and computes ``t`` itself.)"""
    programs = device_limits(device).sm_count

    def grid(meta):
        return (max(1, min(programs, num_tiles(meta))),)

    return grid


def _cuda_core_dots(dtype: torch.dtype, precision: str) -> bool:
    """Whether the main loop's dots run on the CUDA cores: fp32 operands at "ieee" precision."""
    return dtype == torch.float32 and precision == "ieee"


def _grad_b_block_m(M: int, R: int, device: torch.device, dtype: torch.dtype) -> int:
    """Row block of the grad_x pass when it writes grad_B partials, fixed before the launch because
    the partials' buffer ``[cdiv(M, BLOCK_M), N, R]`` is allocated by it (``arch_rules().grad_b_rows``).
    128 rows only with wgmma/tcgen05 at r ≤ 32: on sm_80 every 128-row grad_x config spilled (112-168
    bytes), and on sm_90a at r = 64 (see ``GRAD_X_CONFIGS``); 32 rows with mma.sync at r ≥ 64, where
    64×64×32 spilled 8-40 bytes on sm_80."""
    if INTERPRET:
        return INTERPRETER_CONFIGS[0].kwargs["BLOCK_M"]
    if _cuda_core_dots(dtype, _precisions(dtype)[0]):  # only 32-row tiles kept off the stack there
        return min(32, max(16, triton.next_power_of_2(M)))
    wide, narrow = arch_rules(device_limits(device).capability).grad_b_rows
    most = wide if _padded_rank(R) <= 32 else narrow
    return min(most, max(16, triton.next_power_of_2(M)))


def _launch_gemm(
    a, w, w_trans: bool, la, lb, bias, out, t, scaling: float, dropout: _Dropout, dropout_site,
    xa=None, grad_b_ws=None, bias_ws=None, block_m_fixed: int = 0, decode: bool = False, row0: int = 0,
) -> None:  # fmt: skip
    """``out = a·w + scaling·D(a·la)·lb + bias`` and ``t = D(a·la)`` (fp32), for logical 2-D views
    ``a [M, K]``, ``w [K, N]`` (``w_trans``: ``w`` is the transpose of a row-major ``W [N, K]``),
    ``la [K, R]``, ``lb [R, N]``. ``out`` or ``t`` may be None (not written); ``grad_b_ws`` /
    ``bias_ws`` (with ``xa``) receive the fused grad_B / bias partials of ``aᵀ·xa`` / ``Σ a``;
    ``decode`` allows the split-K path for short ``a`` (the forward's dropout site only); ``a`` holds
    rows ``row0…`` of the whole input (the dropout counter's row)."""
    M, K = a.shape
    N = w.shape[1]
    R = la.shape[1]
    device = a.device
    precision, low_rank_precision = _precisions(a.dtype)
    write_out, store_t = out is not None, t is not None
    split_k = decode and M <= _DECODE_MAX_M
    splits = _decode_splits(device, M, N, K) if split_k else 1
    split_k = splits > 1
    use_tma = _use_tma(device, a, w.t() if w_trans else w, None if split_k else out)
    dummy = a  # a pointer argument the kernel never dereferences (flags excepted, see _flag_dummy)
    partials = t_partials = None
    if split_k:
        partials = _triton_common._empty((splits, M, N), torch.float32, device)
        t_partials = _triton_common._empty((splits, M, R), torch.float32, device)
    with_flags = write_out and store_t and not split_k
    out_buf = partials if split_k else out
    t_buf = t_partials if split_k else t

    def num_tiles(meta):
        num_n = triton.cdiv(N, meta["BLOCK_N"]) if write_out else 1
        return triton.cdiv(M, meta["BLOCK_M"]) * num_n * splits

    grid = _grid(num_tiles, device)
    def strides(buf):  # rows, columns, splits
        return (buf.stride(-2), buf.stride(-1), buf.stride(0) if split_k else 0) if buf is not None else (0, 0, 0)

    out_strides, t_strides = strides(out_buf), strides(t_buf)
    launcher = _lora_gemm_grad_x if grad_b_ws is not None else _lora_gemm
    with on_device(device):
        # A pair of int32 a row block (of 16 rows at least), zero before and after every launch.
        flags = _flag_workspace(device, 2 * triton.cdiv(M, 16)) if with_flags else _flag_dummy(device)
        launcher[grid](
            a, w, la, lb, bias if bias is not None else dummy, out_buf if write_out else dummy,
            t_buf if store_t else dummy, flags, xa if xa is not None else dummy,
            grad_b_ws if grad_b_ws is not None else dummy, bias_ws if bias_ws is not None else dummy,
            M, N, K, R, triton.next_power_of_2(M), block_m_fixed, splits, row0,
            *a.stride(), *w.stride(), *la.stride(), *lb.stride(), *out_strides, *t_strides,
            *(xa.stride() if xa is not None else (0, 0)),
            *(grad_b_ws.stride()[:2] if grad_b_ws is not None else (0, 0)),
            bias_ws.stride(0) if bias_ws is not None else 0,
            scaling, dropout.p, dropout.scale, dropout.seed, _SPIN_LIMIT,
            HAS_BIAS=bias is not None, WRITE_OUT=write_out, STORE_T=store_t, SPLIT_K=split_k,
            FUSE_GRAD_B=grad_b_ws is not None, BIAS_GRAD=bias_ws is not None, SPLIT_XA=a.dtype != torch.float32,
            USE_TMA=use_tma, W_TRANS=w_trans,
            R_PAD=_padded_rank(R), DROPOUT=dropout_site.value if dropout.p else NO_DROPOUT.value,
            PRECISION=precision, LOW_RANK_PRECISION=low_rank_precision,
            UPCAST=INTERPRET and a.dtype == torch.bfloat16,
            FP32_ADAPTERS=la.dtype == torch.float32 and a.dtype != torch.float32,
        )  # fmt: skip
        if split_k:
            block_m, block_n = 16, 64
            _split_k_reduce_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
                partials, t_partials, lb, bias if bias is not None else dummy, out, t,
                M, N, R, splits, *lb.stride(), *out.stride(), *t.stride(), scaling,
                HAS_BIAS=bias is not None, R_PAD=_padded_rank(R), LOW_RANK_PRECISION=low_rank_precision,
                BLOCK_M=block_m, BLOCK_N=block_n,
            )  # fmt: skip


def triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M = x.shape[0]
    y = _triton_common._empty((M, weight.shape[0]), x.dtype, x.device)
    xa = _triton_common._empty((M, lora_A.shape[0]), torch.float32, x.device)
    if M:
        dropout = _dropout(dropout_p, seed)
        _launch_gemm(
            x, weight.t(), True, lora_A.t(), lora_B.t(), bias, y, xa, scaling, dropout, DROPOUT_ON_INPUT, decode=True
        )
    return y, xa


def triton_backward(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    M, N = gy.shape
    R = lora_A.shape[0]
    dropout = _dropout(dropout_p, seed)
    grad_x = _triton_common._empty(x.shape, x.dtype, x.device) if need_x else x.new_empty((0,))
    # gy B feeds grad_A, and grad_x's epilogue: its consumers read it from this buffer.
    g_xa = _triton_common._empty((M, R), torch.float32, x.device) if need_A or need_x else None
    grad_A, grad_B, grad_bias = lora_A.new_empty((0,)), lora_B.new_empty((0,)), gy.new_empty((0,))
    if M == 0:
        grad_A = torch.zeros_like(lora_A) if need_A else grad_A
        grad_B = torch.zeros_like(lora_B) if need_B else grad_B
        grad_bias = gy.new_zeros((N,)) if need_bias else grad_bias
        return grad_x, grad_A, grad_B, grad_bias
    block_m = _grad_b_block_m(M, R, x.device, x.dtype) if need_B or need_bias else 0
    # The grad_B partials take cdiv(rows, block_m)·N·R fp32: rows go in launches that keep them within
    # _MAX_PARTIAL_BYTES (at r = 64, 64-row blocks, all of M = 8192 at once would take 128 MiB).
    rows = max(_MIN_PARTIAL_BLOCKS, _MAX_PARTIAL_BYTES // (4 * N * R)) * block_m if block_m else M
    row_blocks = triton.cdiv(min(rows, M), block_m) if block_m else 0
    grad_b_ws = _triton_common._empty((row_blocks, N, R), torch.float32, x.device) if block_m else None
    bias_ws = _triton_common._empty((row_blocks, N), torch.float32, x.device) if need_bias else None
    grad_b_sum = torch.zeros((N, R), dtype=torch.float32, device=x.device) if need_B else None
    bias_sum = torch.zeros((N,), dtype=torch.float32, device=x.device) if need_bias else None
    for m0 in range(0, M, rows):
        m1 = min(m0 + rows, M)
        blocks = triton.cdiv(m1 - m0, block_m) if block_m else 0
        _launch_gemm(
            gy[m0:m1], weight, False, lora_B, lora_A, None, grad_x[m0:m1] if need_x else None,
            g_xa[m0:m1] if g_xa is not None else None, scaling, dropout, DROPOUT_ON_LOW_RANK,
            xa=xa[m0:m1], grad_b_ws=grad_b_ws, bias_ws=bias_ws, block_m_fixed=block_m, row0=m0,
        )  # fmt: skip
        if need_B:  # summed over row blocks in order, then launches in order: deterministic
            grad_b_sum += grad_b_ws[:blocks].sum(0)
        if need_bias:
            bias_sum += bias_ws[:blocks].sum(0)
    if need_A:
        grad_A = _reduce_over_m(g_xa, x, scaling, lora_A.dtype, rhs_dropout=dropout)[0]
    if need_B:
        grad_B = (grad_b_sum * scaling).to(lora_B.dtype)
    if need_bias:
        grad_bias = bias_sum.to(gy.dtype)
    return grad_x, grad_A, grad_B, grad_bias


def launch_for_inspection(
    M: int, K: int, N: int, r: int, dtype: torch.dtype, adapter_dtype: torch.dtype, dropout: bool, backward: bool
) -> None:
    """Run the launchers on CPU tensors of one problem, exactly as a real call launches them (the
    forward, and the backward too if ``backward``), for ``fastlora inspect`` to intercept."""
    x = torch.randn(M, K, dtype=dtype)
    weight = torch.randn(N, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    lora_A = torch.randn(r, K, dtype=adapter_dtype)
    lora_B = torch.randn(N, r, dtype=adapter_dtype)
    p, seed = (0.1, torch.tensor(0)) if dropout else (0.0, None)
    y, xa = triton_forward(x, weight, bias, lora_A, lora_B, 1.0, p, seed)
    if backward:
        triton_backward(torch.randn_like(y), x, xa, weight, lora_A, lora_B, 1.0, p, seed, True, True, True, True)


TRITON_OPS = register_backend(
    "triton", triton_forward, triton_backward, runs_on=("cuda", "cpu") if INTERPRET else ("cuda",)
)
