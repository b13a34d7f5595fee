"""The jit code of the ``"triton"`` backend (``fastlora.ops.triton_lora``, whose docstring states
the design): ``_lora_gemm_kernel``, the persistent fused GEMM (forward, grad_x with the fused
grad_B / bias partials, split-K decode), its device functions, and ``_split_k_reduce_kernel``.
Configs and their pruning: ``_triton_lora_configs``; launches: ``triton_lora``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_common import _dot


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
def _load_a(a_src, off_m, k0, offs_m, offs_k, mask_m, K, stride_am, stride_ak, USE_TMA: tl.constexpr):
    """The ``a`` tile of rows ``offs_m`` and K step ``k0``, through its descriptor or pointers."""
    if USE_TMA:
        a = a_src.load([off_m, k0])
    else:
        a_ptrs = a_src + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    return a


@triton.jit
def _low_rank_step(
    a, acc_t, la_ptr, offs_m, offs_k, offs_r, K, R, stride_lak, stride_lar, dropout_p, seed, row0,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP32_ADAPTERS: tl.constexpr,
):  # fmt: skip
    """``acc_t + D(a)·la[offs_k]`` for one K step (the producer's and ``_recompute_t``'s alike)."""
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
    return acc_t


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
        a = _load_a(a_src, off_m, k0, offs_m, offs_k, mask_m, K, stride_am, stride_ak, USE_TMA)
        if WRITE_OUT:
            if USE_TMA:
                if W_TRANS:
                    w = tl.trans(w_src.load([off_n, k0]))
                else:
                    w = w_src.load([k0, off_n])
            else:
                # int64: in grad_x, offs_k runs over W's rows and stride_wk is K; W may exceed 2³¹ elements.
                w_ptrs = w_src + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn
                w = tl.load(w_ptrs, mask=(offs_k < K)[:, None] & (offs_n < N)[None, :], other=0.0)
            acc = _dot(a, w, acc, PRECISION, UPCAST)
        if LOW_RANK:
            acc_t = _low_rank_step(
                a, acc_t, la_ptr, offs_m, offs_k, offs_r, K, R, stride_lak, stride_lar, dropout_p, seed, row0,
                DROPOUT, PRECISION, UPCAST, FP32_ADAPTERS,
            )  # fmt: skip
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
    col_scale_ptr, HAS_COL_SCALE: tl.constexpr,
):  # fmt: skip
    """Store ``acc + t·lb (+ bias)`` for output columns ``[off_n, off_n + HALF_N)``; ``t`` carries the
    scaling (and the dropout scale of ``DROPOUT_ON_LOW_RANK``). ``HAS_COL_SCALE`` (DoRA's ``m/n``,
    fp32 ``[N]``, contiguous): ``col_scale ⊙ (acc + t·lb) (+ bias)``, on the fp32 accumulator."""
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
    if HAS_COL_SCALE:
        acc *= tl.load(col_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
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
    a_src, la_ptr, off_m, k_lo, k_hi, M, K, R, stride_am, stride_ak, stride_lak, stride_lar,
    dropout_p, dropout_scale, seed, row0,
    USE_TMA: tl.constexpr, R_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP32_ADAPTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A consumer's fallback when its wait timed out: the row block's ``t = D(a)·la`` by the
    producer's K steps (the same loads, dots, dropout draws and fp32-adapter split, without ``a·w``),
    so the two agree to the bit where the dots are the same instructions. Not software-pipelined
    (``num_stages=1``), a path taken only when a producer's program is late or not resident. Its
    cost in the compiled kernel (sm_90a, fastlora inspect, r = 16, dropout, against the same kernel
    without the branch): none on the forward configs and on grad_x with bf16 adapters; grad_x
    128×64×64/8 warps with fp32 adapters went from no stack to 32 bytes, which the compiler-informed
    pruning (``drop_spilling``) cannot avoid there (the only 128-row grad_x config): still open."""
    offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    acc_t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for step in tl.range(k_lo, k_hi, num_stages=1):
        k0 = step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _load_a(a_src, off_m, k0, offs_m, offs_k, mask_m, K, stride_am, stride_ak, USE_TMA)
        acc_t = _low_rank_step(
            a, acc_t, la_ptr, offs_m, offs_k, offs_r, K, R, stride_lak, stride_lar, dropout_p, seed, row0,
            DROPOUT, PRECISION, UPCAST, FP32_ADAPTERS,
        )  # fmt: skip
    return _finish_t(acc_t, dropout_scale, offs_r < R, DROPOUT)


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


# seed: a new value every call; specialising on it would compile for seed == 1 and % 16.
@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_kernel(
    a_ptr, w_ptr, la_ptr, lb_ptr, bias_ptr, out_ptr, t_ptr, flags_ptr, xa_ptr, gb_ws_ptr, bias_ws_ptr,
    M, N, K, R, M_BUCKET, BLOCK_M_FIXED, SPLITS, row0,
    stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar, stride_lbr, stride_lbn,
    stride_om, stride_on, stride_os, stride_tm, stride_tr, stride_ts, stride_xam, stride_xar,
    stride_gbm, stride_gbk, stride_bwm,
    scaling, dropout_p, dropout_scale, seed, spin_limit,
    col_scale_ptr,  # DoRA's per-column factor, fp32 [N], with HAS_COL_SCALE (the forward's epilogue only)
    HAS_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr, STORE_T: tl.constexpr, SPLIT_K: tl.constexpr,
    FUSE_GRAD_B: tl.constexpr, BIAS_GRAD: tl.constexpr, SPLIT_XA: tl.constexpr, USE_TMA: tl.constexpr,
    W_TRANS: tl.constexpr, R_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP32_ADAPTERS: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
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
                if ready != 1:
                    # Timed out: this row block's t from a itself, as its producer computes it, stored
                    # where the producer stores it (the same values; each element is one or the other),
                    # then read back like a published t. (A branch yielding t in registers instead had
                    # to merge two layouts: 8 more bytes of stack in grad_x 128×64×64 on sm_90a.)
                    t_own = _recompute_t(
                        a_src, la_ptr, off_m, k_lo, k_hi, M, K, R, stride_am, stride_ak, stride_lak, stride_lar,
                        dropout_p, dropout_scale, seed, row0,
                        USE_TMA, R_PAD, DROPOUT, PRECISION, UPCAST, FP32_ADAPTERS, BLOCK_M, BLOCK_K,
                    )  # fmt: skip
                    tl.store(t_ptrs, t_own, mask=mask_m[:, None] & mask_r[None, :])
                    tl.debug_barrier()  # every thread's stores before any thread reads them back
                # .cg: read t from L2, where the producer's stores are, not from a stale L1 line.
                acc_t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0, cache_modifier=".cg")
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
                    col_scale_ptr, HAS_COL_SCALE,
                )  # fmt: skip
                _epilogue_half(
                    acc1, t, lb_ptr, bias_ptr, out_dst, off_m, off_n + HALF_N, M, N, R,
                    stride_lbr, stride_lbn, stride_om, stride_on, dropout_p, seed, row0,
                    HAS_BIAS, DROPOUT, USE_TMA, R_PAD, LOW_RANK_PRECISION, BLOCK_M, HALF_N,
                    col_scale_ptr, HAS_COL_SCALE,
                )  # fmt: skip


@triton.jit
def _split_k_reduce_kernel(
    part_ptr, t_part_ptr, lb_ptr, bias_ptr, out_ptr, t_ptr,
    M, N, R, SPLITS,
    stride_lbr, stride_lbn, stride_om, stride_on, stride_tm, stride_tr,
    scaling, col_scale_ptr,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
):  # fmt: skip
    """Decode's second pass: ``out = Σ_s part[s] + scaling·t·lb + bias`` and ``t = Σ_s t_part[s]``,
    for contiguous fp32 partials ``part [S, M, N]``, ``t_part [S, M, R]``, summed in split order;
    with ``HAS_COL_SCALE``, ``out = col_scale ⊙ (Σ_s part[s] + scaling·t·lb) + bias`` (fp32 ``[N]``)."""
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
    if HAS_COL_SCALE:
        acc *= tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_mn)
