"""The QLoRA kernels (``triton_qlora`` launches them, ``_qlora_configs`` tunes them).

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

Under ``TRITON_INTERPRET=1`` (the CPU tests) each kernel runs one configuration and bf16 operands are
upcast before ``tl.dot``, whose bf16 form the interpreter gets wrong.
"""

import triton
import triton.language as tl

from ._triton_common import _dot, _dot_tf32_exact_a


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


# seed: a new value every call; specialising on it would compile for seed == 1 and % 16.
@triton.jit(do_not_specialize=["seed"])
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
                acc_t = _dot_tf32_exact_a(a, la, acc_t, LOW_RANK_PRECISION)
            else:
                acc_t = _dot(a, la.to(a.dtype), acc_t, PRECISION, UPCAST)
            la_ptrs += BLOCK_K * stride_lak
        a_ptrs += BLOCK_K * stride_ak
        w_origin += BLOCK_K * stride_wk
    if T_GIVEN:  # t = D(a)·la from _qlora_low_rank_kernel (the forward with dropout)
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
        acc_t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)

    if STORE_T:
        if pid_n == 0:
            t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
            tl.store(t_ptrs, acc_t, mask=mask_m[:, None] & mask_r[None, :])
    if WRITE_OUT:
        if not T_GIVEN:  # padding columns of t are a·0, NaN where a holds an inf: zero them (loaded t: 0)
            acc_t = tl.where(mask_r[None, :], acc_t, 0.0)
        lb_ptrs = lb_ptr + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
        lb = tl.load(lb_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        low_rank = _dot(acc_t, lb, None, LOW_RANK_PRECISION, False)
        if DROPOUT_OUT:  # grad_x's D(·): element (m, k) of grad_x has the forward's counter m·K + k
            keep = tl.rand(seed, offs_m[:, None] * N + offs_n[None, :]) >= dropout_p
            low_rank = tl.where(keep, low_rank * dropout_scale, 0.0)
        acc += scaling * low_rank
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# seed: a new value every call; specialising on it would compile for seed == 1 and % 16.
@triton.jit(do_not_specialize=["seed"])
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
            acc_t = _dot_tf32_exact_a(a, la, acc_t, LOW_RANK_PRECISION)
        else:
            acc_t = _dot(a, la.to(a.dtype), acc_t, PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        la_ptrs += BLOCK_K * stride_lak
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, acc_t * dropout_scale, mask=mask_m[:, None] & mask_r[None, :])
