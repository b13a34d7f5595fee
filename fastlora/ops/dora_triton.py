"""Triton kernel of DoRA's backward prologue (``fastlora.dora``): one pass over ``gy`` and ``y``.

For ``gy [M, N]``, the forward's output ``y [M, N]`` and the column factor ``g = m/n [N]`` (fp32)::

    gy_s = gy ⊙ g                     [M, N] in gy's dtype, the input of the LoRA backward
    dot_j = Σ_i gy_ij · y_ij          [N] fp32, the magnitude gradient's numerator
    sum_j = Σ_i gy_ij                 [N] fp32 (only with a bias: Σ gy·(y − b) = dot − b·sum)

The torch composition reads gy three times and y once and writes gy_s and an M×N product; this
kernel reads each once and writes gy_s: 3·M·N·bytes instead of about 6. Products and sums are in
fp32. M is split across programs (about two an SM, ``_split_count``), each writing fp32 column
partials that ``torch.sum`` adds in a fixed order: deterministic, no atomics.

Hazards read against the checklist: the launch runs in ``on_device`` (device guard, current
stream); no thread-local state; nothing is cached between calls (autotuner reruns and CUDA-graph
replays recompute everything from the inputs); row offsets are int64 (M·N may exceed 2³¹).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton_common
from ._triton_common import INTERPRET, _split_count, cdiv, on_device


@triton.jit
def _dora_grad_kernel(
    gy_ptr, y_ptr, scale_ptr, gys_ptr, dot_ptr, sum_ptr,
    M, N, rows_per_split,
    stride_gy_m, stride_gy_n, stride_y_m, stride_y_n,
    HAS_SUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, M)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows[:, None] < row_end) & col_mask[None, :]
        g = tl.load(gy_ptr + rows[:, None] * stride_gy_m + cols[None, :] * stride_gy_n, mask=mask, other=0.0)
        g = g.to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_y_m + cols[None, :] * stride_y_n, mask=mask, other=0.0)
        gys = g * scale[None, :]
        tl.store(gys_ptr + rows[:, None] * N + cols[None, :], gys.to(gys_ptr.dtype.element_ty), mask=mask)
        dot += tl.sum(g * y.to(tl.float32), axis=0)
        if HAS_SUM:
            total += tl.sum(g, axis=0)
    tl.store(dot_ptr + split.to(tl.int64) * N + cols, dot, mask=col_mask)
    if HAS_SUM:
        tl.store(sum_ptr + split.to(tl.int64) * N + cols, total, mask=col_mask)


def dora_grad_prologue(gy: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, with_sum: bool):
    """``(gy_s [M, N] in gy.dtype, dot [N] fp32, sum [N] fp32 or None)`` (module doc) for 2-D
    ``gy`` and ``y`` of one shape (any strides) and ``scale [N]`` (cast to fp32 here)."""
    M, N = gy.shape
    if y.shape != gy.shape or scale.shape != (N,):
        raise ValueError(f"dora_grad_prologue: gy {tuple(gy.shape)}, y {tuple(y.shape)}, scale {tuple(scale.shape)}")
    device = gy.device
    gys = _triton_common._empty((M, N), gy.dtype, device)
    if M == 0:
        zeros = torch.zeros(N, dtype=torch.float32, device=device)
        return gys, zeros, (zeros.clone() if with_sum else None)
    scale = scale.to(torch.float32).contiguous()
    block_m, block_n = (32, 64) if INTERPRET else (32, 128)
    col_tiles, row_blocks = cdiv(N, block_n), cdiv(M, block_m)
    rows_per_split = cdiv(row_blocks, _split_count(device, col_tiles, row_blocks)) * block_m
    splits = cdiv(M, rows_per_split)
    dots = _triton_common._empty((splits, N), torch.float32, device)
    sums = _triton_common._empty((splits, N), torch.float32, device) if with_sum else dots  # dots: never written
    with on_device(device):
        _dora_grad_kernel[(col_tiles, splits)](
            gy, y, scale, gys, dots, sums,
            M, N, rows_per_split,
            *gy.stride(), *y.stride(),
            HAS_SUM=with_sum, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
    return gys, dots.sum(0), (sums.sum(0) if with_sum else None)


def launch_for_inspection(
    M: int, K: int, N: int, r: int, dtype: torch.dtype, adapter_dtype: torch.dtype, dropout: bool, backward: bool
) -> None:
    """Run the launchers on CPU tensors of one problem as DoRA launches them, for ``fastlora
    inspect`` to intercept: the forward with the column factor in its epilogue
    (``HAS_COL_SCALE``; without dropout, the only way DoRA runs it: with dropout in training DoRA is
    an autograd composition), and with ``backward`` the backward prologue (with a bias, so with the
    column sums)."""
    from .triton_lora import triton_forward_scaled

    x, weight, bias = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    lora_A, lora_B = torch.randn(r, K, dtype=adapter_dtype), torch.randn(N, r, dtype=adapter_dtype)
    triton_forward_scaled(x, weight, bias, lora_A, lora_B, 1.0, 0.0, None, torch.rand(N) + 0.5)
    if backward:
        dora_grad_prologue(torch.randn(M, N, dtype=dtype), torch.randn(M, N, dtype=dtype), torch.rand(N), True)
