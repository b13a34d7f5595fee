"""The ``"triton"`` backend: fused LoRA forward and backward kernels.

Two kernels serve all of forward and backward:

``_lora_matmul_kernel`` computes ``out = a·w + scaling·(a·la)·lb + bias`` and ``t = a·la`` in one pass:
each program owns one ``[BLOCK_M, BLOCK_N]`` output tile, and every ``a`` tile it loads feeds both
the base product (``acc``) and the rank-r product (``acc_t``, fp32, ``R_PAD`` columns). The
low-rank term and the bias are added to the fp32 accumulator in the epilogue and the output is
written once; the programs of the first column of tiles also write ``t``.

    forward : a = x [M, K],  w = Wᵀ, la = Aᵀ, lb = Bᵀ  →  out = y,      t = x Aᵀ   (saved for backward)
    grad_x  : a = gy [M, N], w = W,  la = B,  lb = A   →  out = grad_x, t = gy B   (feeds grad_A)

LoRA dropout (``D``) never stores a mask: each element's keep bit is ``tl.rand(seed, m·K + k) ≥ p``,
a counter-based draw that the backward regenerates. The forward applies it to the ``a`` tiles that
feed ``acc_t`` (``DROPOUT_ON_A``); ``grad_x`` applies it to the low-rank term of its epilogue
(``DROPOUT_ON_LOW_RANK``: ``D`` is elementwise, so ``D(x)·Aᵀ`` transposes to ``D(g·A)``); ``grad_A``
applies it to the ``x`` tiles of the reduction.

``_lora_reduce_kernel`` computes ``scaling·lhsᵀ·rhs`` over the long M axis for the two adapter
gradients, ``grad_A = scaling·(gy B)ᵀ x`` and ``grad_B = scaling·gyᵀ (x Aᵀ)``, optionally with
the column sums of ``lhs`` (the bias gradient, read from the same ``gy`` tiles). M is split across
programs that write fp32 partials to a workspace, summed afterwards: deterministic, no atomics.

Precision: fp16/bf16 tiles go to the tensor cores with fp32 accumulation. With fp32 adapters on a
half base (PEFT's default) the rank-r products take the ``x`` tile converted to fp32 in registers
(no fp32 copy of ``x`` is ever made), as PEFT runs that branch in fp32: rounding the adapters to
bf16 instead gave 1.5e-2 relative error in ``grad_B`` on a fuzzed r=1 case. ``t`` stays fp32, so an fp16
input whose ``x Aᵀ`` exceeds fp16's range is still right; products with ``t`` run in fp32 (TF32 on
the tensor cores, whose 10-bit mantissa holds fp16/bf16 operands exactly). fp32 inputs use exact
fp32 products unless ``torch.set_float32_matmul_precision`` allows TF32.

Under ``TRITON_INTERPRET=1`` (the CPU test suite) each kernel runs one fixed configuration, and
bf16 operands are upcast to fp32 before ``tl.dot`` because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._device import device_limits
from ._contract import register_backend
from ._triton_compile import drop_spilling

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Where _lora_matmul_kernel applies LoRA dropout (its DROPOUT parameter; csrc names the same sites
# DropoutSite::kA / kLowRank): nowhere, to the a tiles of a·la, or to the (a·la)·lb term.
NO_DROPOUT: tl.constexpr = tl.constexpr(0)
DROPOUT_ON_A: tl.constexpr = tl.constexpr(1)
DROPOUT_ON_LOW_RANK: tl.constexpr = tl.constexpr(2)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels fill comes from here (the tests patch it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _lora_matmul_kernel(
    a_ptr, w_ptr, la_ptr, lb_ptr, bias_ptr, out_ptr, t_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_wk, stride_wn, stride_lak, stride_lar, stride_lbr, stride_lbn,
    stride_om, stride_on, stride_tm, stride_tr,
    scaling, dropout_p, dropout_scale, seed,
    HAS_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr, STORE_T: tl.constexpr, R_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, LOW_RANK_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP32_ADAPTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped tile order: GROUP_M row blocks share each w column block while it is in L2.
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

    # int64 row/column offsets: M·stride can pass 2³¹ on large activations.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    la_ptrs = la_ptr + offs_k[:, None] * stride_lak + offs_r[None, :] * stride_lar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if WRITE_OUT:
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _dot(a, w, acc, PRECISION, UPCAST)
        la = tl.load(la_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DROPOUT == DROPOUT_ON_A:
            keep = tl.rand(seed, offs_m[:, None] * K + (k0 + offs_k)[None, :]) >= dropout_p
            a = tl.where(keep, a, 0.0)
        if FP32_ADAPTERS:
            acc_t = tl.dot(a.to(tl.float32), la, acc_t, input_precision=LOW_RANK_PRECISION)
        else:
            acc_t = _dot(a, la.to(a.dtype), acc_t, PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
        la_ptrs += BLOCK_K * stride_lak
    if DROPOUT == DROPOUT_ON_A:
        acc_t *= dropout_scale

    if STORE_T:
        if pid_n == 0:
            t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
            tl.store(t_ptrs, acc_t, mask=mask_m[:, None] & mask_r[None, :])
    if WRITE_OUT:
        # Padding columns of t are a·0, which is NaN where a holds an inf: zero them explicitly.
        acc_t = tl.where(mask_r[None, :], acc_t, 0.0)
        lb_ptrs = lb_ptr + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
        lb = tl.load(lb_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        low_rank = tl.dot(acc_t, lb, input_precision=LOW_RANK_PRECISION)
        if DROPOUT == DROPOUT_ON_LOW_RANK:
            keep = tl.rand(seed, offs_m[:, None] * N + offs_n[None, :]) >= dropout_p
            low_rank = tl.where(keep, low_rank * dropout_scale, 0.0)
        acc += scaling * low_rank
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_reduce_kernel(
    lhs_ptr, rhs_ptr, ws_ptr, col_sum_ptr,
    M, P, Q, rows_per_split,
    stride_lm, stride_lp, stride_rm, stride_rq,
    stride_ws_split, stride_ws_p, stride_ws_q, stride_cs_split,
    scaling, dropout_p, seed,
    COL_SUM: tl.constexpr, RHS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    # ws[split] = scaling · lhs[rows, :]ᵀ · D(rhs[rows, :]) over this split's rows (D: the dropout mask,
    # unscaled: its 1/(1 − p) is folded into scaling); col_sum[split] = Σ lhs[rows, :].
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    split = tl.program_id(2)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    row_start = split * rows_per_split
    row_end = min(row_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        offs_m = offs_m.to(tl.int64)
        lhs = tl.load(
            lhs_ptr + offs_m[:, None] * stride_lm + offs_p[None, :] * stride_lp,
            mask=mask_m[:, None] & mask_p[None, :],
            other=0.0,
        ).to(tl.float32)
        rhs = tl.load(
            rhs_ptr + offs_m[:, None] * stride_rm + offs_q[None, :] * stride_rq,
            mask=mask_m[:, None] & mask_q[None, :],
            other=0.0,
        ).to(tl.float32)
        if RHS_DROPOUT:
            rhs = tl.where(tl.rand(seed, offs_m[:, None] * Q + offs_q[None, :]) >= dropout_p, rhs, 0.0)
        acc = tl.dot(tl.trans(lhs), rhs, acc, input_precision=PRECISION)
        if COL_SUM:
            col_sum += tl.sum(lhs, axis=0)

    ws_ptrs = ws_ptr + split.to(tl.int64) * stride_ws_split + offs_p[:, None] * stride_ws_p + offs_q[None, :] * stride_ws_q
    tl.store(ws_ptrs, acc * scaling, mask=mask_p[:, None] & mask_q[None, :])
    if COL_SUM:
        if pid_q == 0:
            tl.store(col_sum_ptr + split * stride_cs_split + offs_p, col_sum, mask=mask_p)


def _configs(shapes) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# The interpreter cannot benchmark, and its cost grows with programs × K steps: one big tile.
INTERPRETER_CONFIGS = _configs([(64, 64, 64, 4, 1)])
GPU_CONFIGS = _configs(
    [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 128, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 256, 4, 3),
        (16, 64, 128, 4, 3),
        # Short K steps and two stages keep the Aᵀ tile of r = 256 (fp32 adapters: 32 KiB a step) in
        # shared memory, where every config above is pruned.
        (64, 64, 32, 4, 2),
        (32, 64, 32, 4, 2),
    ]
)


# Accumulator registers a thread may hold (acc and acc_t, fp32) before a config is not worth timing.
_MAX_ACC_REGISTERS = 160
# Shared memory the pipelined tiles may take: the A100's 164 KiB less some room (the H100 has 227).
_MAX_SHARED_BYTES = 160 * 1024


def _shared_bytes(config, a_size: int, la_size: int, rank: int) -> int:
    """Shared memory of the main loop's pipelined tiles: ``a``, ``w`` and ``la``, one set a stage."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (bk * (bm + bn) * a_size + bk * rank * la_size)


def prune_matmul_configs(configs, named_args, **kwargs):
    """Drop configs whose row block dwarfs M, or whose accumulators or tiles are too large by a fast
    formula (large ``R_PAD``, fp32 operands), then those the compiler says spill registers or
    overflow shared memory; the leanest config if none is left."""
    args = {**named_args, **kwargs}
    rank, m_bucket = args["R_PAD"], args["M_BUCKET"]
    a_size, la_size = args["a_ptr"].element_size(), args["la_ptr"].element_size()

    def registers(c):
        return c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + rank) / (32 * c.num_warps)

    def fits(c):
        return registers(c) <= _MAX_ACC_REGISTERS and _shared_bytes(c, a_size, la_size, rank) <= _MAX_SHARED_BYTES

    kept = [c for c in configs if fits(c) and c.kwargs["BLOCK_M"] <= max(16, m_bucket)]
    if not kept:
        return [min(configs, key=lambda c: (_shared_bytes(c, a_size, la_size, rank), registers(c)))]
    return drop_spilling(_lora_matmul_kernel, kept, named_args, **kwargs)


# Keyed on M's power-of-two bucket (M_BUCKET, an argument only the autotuner reads) rather than on M,
# so that training on varying sequence lengths does not re-tune at every new batch size.
_lora_matmul = triton.autotune(
    configs=INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "WRITE_OUT", "STORE_T", "DROPOUT"],
    prune_configs_by={"early_config_prune": prune_matmul_configs},
)(_lora_matmul_kernel)


def _padded_rank(size: int) -> int:
    return max(16, triton.next_power_of_2(size))  # tl.dot needs every dimension >= 16


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    """``tl.dot`` input precision of the main loop and of the fp32 low-rank products."""
    fp32 = "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"
    return fp32, ("tf32" if dtype in (torch.float16, torch.bfloat16) else fp32)


class _Dropout(NamedTuple):
    """LoRA dropout of one call: probability, seed, and ``1/(1 − p)`` (0 when everything drops)."""

    p: float
    seed: int

    @property
    def scale(self) -> float:
        return 1 / (1 - self.p) if self.p < 1 else 0.0


_NO_DROPOUT = _Dropout(0.0, 0)


def _dropout(dropout_p: float, seed) -> _Dropout:
    return _Dropout(dropout_p, int(seed)) if dropout_p else _NO_DROPOUT


def _launch_matmul(a, w, la, lb, bias, out, t, scaling: float, dropout: _Dropout, dropout_site) -> None:
    """``out = a·w + scaling·(a·la)·lb + bias`` and ``t = a·la`` (fp32), for logical 2-D views
    ``a [M, K]``, ``w [K, N]``, ``la [K, R]``, ``lb [R, N]``. ``out`` or ``t`` may be None (not written).
    ``dropout_site`` ``DROPOUT_ON_A`` drops elements of ``a`` in ``a·la``, ``DROPOUT_ON_LOW_RANK``
    elements of ``(a·la)·lb`` (see module doc)."""
    M, K = a.shape
    N = w.shape[1]
    R = la.shape[1]
    precision, low_rank_precision = _precisions(a.dtype)
    write_out = out is not None
    out_or_t = out if write_out else t
    t_strides = t.stride() if t is not None else (0, 0)

    def grid(meta):
        num_n = triton.cdiv(N, meta["BLOCK_N"]) if write_out else 1
        return (triton.cdiv(M, meta["BLOCK_M"]) * num_n,)

    _lora_matmul[grid](
        a, w, la, lb, bias if bias is not None else out_or_t, out_or_t, t if t is not None else out_or_t,
        M, N, K, R, triton.next_power_of_2(M),
        *a.stride(), *w.stride(), *la.stride(), *lb.stride(), *out_or_t.stride(), *t_strides,
        scaling, dropout.p, dropout.scale, dropout.seed,
        HAS_BIAS=bias is not None, WRITE_OUT=write_out, STORE_T=t is not None, R_PAD=_padded_rank(R),
        DROPOUT=(dropout_site if dropout.p else NO_DROPOUT).value,
        PRECISION=precision, LOW_RANK_PRECISION=low_rank_precision,
        UPCAST=INTERPRET and a.dtype == torch.bfloat16,
        FP32_ADAPTERS=la.dtype == torch.float32 and a.dtype != torch.float32,
    )  # fmt: skip


def _split_count(device: torch.device, tiles: int, row_blocks: int) -> int:
    """Splits of M that give about two programs per SM."""
    programs = 2 * device_limits(device).sm_count
    return max(1, min(row_blocks, programs // tiles))


def _reduce_blocks(P: int, Q: int) -> tuple[int, int]:
    """Output tile of the reduction: each side up to 128, at most 8192 fp32 accumulators a program."""
    block_p = min(128, _padded_rank(P))
    block_q = min(128, _padded_rank(Q))
    while block_p * block_q > 8192:
        if block_p >= block_q:
            block_p //= 2
        else:
            block_q //= 2
    return block_p, block_q


def _reduce_over_m(lhs, rhs, scaling: float, out_dtype: torch.dtype, col_sum: bool = False, rhs_dropout=_NO_DROPOUT):
    """``(scaling·lhsᵀ·D(rhs) [P, Q] in out_dtype, Σ_m lhs [P] fp32 or None)`` for ``lhs [M, P]``,
    ``rhs [M, Q]``; ``D`` is LoRA dropout, the identity by default."""
    M, P = lhs.shape
    Q = rhs.shape[1]
    if M == 0:
        sums = torch.zeros(P, dtype=torch.float32, device=lhs.device) if col_sum else None
        return torch.zeros((P, Q), dtype=out_dtype, device=lhs.device), sums
    block_m = 64
    block_p, block_q = _reduce_blocks(P, Q)
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    row_blocks = triton.cdiv(M, block_m)
    rows_per_split = triton.cdiv(row_blocks, _split_count(lhs.device, tiles, row_blocks)) * block_m
    splits = triton.cdiv(M, rows_per_split)
    ws = _empty((splits, P, Q), torch.float32, lhs.device)
    sums = _empty((splits, P), torch.float32, lhs.device) if col_sum else ws
    _, low_rank_precision = _precisions(rhs.dtype)
    # 8192 fp32 accumulators in 4 warps spill on sm_80 and sm_90a (fastlora inspect: 255 registers and
    # up to 1.3 KiB of stack with r = 64); 8 warps hold them in half the registers a thread.
    num_warps = 8 if block_p * block_q > 4096 else 4
    _lora_reduce_kernel[(triton.cdiv(P, block_p), triton.cdiv(Q, block_q), splits)](
        lhs, rhs, ws, sums,
        M, P, Q, rows_per_split,
        *lhs.stride(), *rhs.stride(), *ws.stride(), sums.stride(0),
        scaling * rhs_dropout.scale, rhs_dropout.p, rhs_dropout.seed,
        COL_SUM=col_sum, RHS_DROPOUT=bool(rhs_dropout.p), PRECISION=low_rank_precision,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q, num_warps=num_warps,
    )  # fmt: skip
    return ws.sum(0).to(out_dtype), (sums.sum(0) if col_sum else None)


def triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M = x.shape[0]
    y = _empty((M, weight.shape[0]), x.dtype, x.device)
    xa = _empty((M, lora_A.shape[0]), torch.float32, x.device)
    if M:
        _launch_matmul(x, weight.t(), lora_A.t(), lora_B.t(), bias, y, xa, scaling, _dropout(dropout_p, seed), DROPOUT_ON_A)
    return y, xa


def triton_backward(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    M = x.shape[0]
    dropout = _dropout(dropout_p, seed)
    grad_x = _empty(x.shape, x.dtype, x.device) if need_x else x.new_empty((0,))
    g_xa = _empty((M, lora_A.shape[0]), torch.float32, x.device) if need_A else None
    if M and (need_x or need_A):
        _launch_matmul(gy, weight, lora_B, lora_A, None, grad_x if need_x else None, g_xa, scaling, dropout, DROPOUT_ON_LOW_RANK)
    if need_A:
        grad_A = _reduce_over_m(g_xa, x, scaling, lora_A.dtype, rhs_dropout=dropout)[0]
    else:
        grad_A = lora_A.new_empty((0,))
    grad_B, grad_bias = lora_B.new_empty((0,)), gy.new_empty((0,))
    if need_B or need_bias:
        grad_B, col_sums = _reduce_over_m(gy, xa, scaling, lora_B.dtype, col_sum=need_bias)
        grad_bias = col_sums.to(gy.dtype) if need_bias else grad_bias
    return grad_x, grad_A, grad_B, grad_bias


def launch_for_inspection(
    M: int, K: int, N: int, r: int, dtype: torch.dtype, adapter_dtype: torch.dtype, dropout: float, backward: bool
) -> None:
    """Launch the kernels of one problem as a training step would (forward, then the backward if
    ``backward``), on CPU tensors: ``fastlora inspect`` intercepts the launches and compiles them for
    a target GPU instead. No bias (LLM projections have none); every gradient is needed."""
    x = torch.empty((M, K), dtype=dtype)
    weight = torch.empty((N, K), dtype=dtype)
    lora_A = torch.empty((r, K), dtype=adapter_dtype)
    lora_B = torch.empty((N, r), dtype=adapter_dtype)
    seed = 0x5EED  # like a drawn seed, neither 1 nor divisible by 16 (either would be specialised)
    _, xa = triton_forward(x, weight, None, lora_A, lora_B, 2.0, dropout, seed)
    if backward:
        gy = torch.empty((M, N), dtype=dtype)
        triton_backward(gy, x, xa, weight, lora_A, lora_B, 2.0, dropout, seed, True, True, True, False)


TRITON_OPS = register_backend(
    "triton", triton_forward, triton_backward, runs_on=("cuda", "cpu") if INTERPRET else ("cuda",)
)
