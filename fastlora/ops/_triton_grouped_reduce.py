"""``grouped_reduce_partials``: the split backward's second launch (``triton_lora``'s ``"split"``
variant), the adapter gradients' reductions over the long M axis for two problems in one grid:

    ws_j[s]   = scaling_j · lhs_j[rows_s]ᵀ · D_j(rhs_j[rows_s])      [S_j, P_j, Q_j]  fp32
    sums_j[s] = Σ_{m ∈ rows_s} lhs_j[m]                              [S_j, P_j]       fp32 (col_sum_j)

    problem 0 (grad_A):          lhs = gy B [M, R] fp32,  rhs = x [M, K],  D = the LoRA dropout mask
                                 (regenerated from its counter, ``m·K + k``; its 1/(1 − p) is in scaling)
    problem 1 (grad_B and bias): lhs = gy [M, N],  rhs = xa = D(x) Aᵀ [M, R] fp32 (the forward's, dropout
                                 already in it), scaling as grad_B's, sums = Σ_m gy (the bias gradient)

``rows_s`` is split ``s`` of M (about two programs an SM for each problem, ``_reduce_layout``). Programs
``[0, n_0)`` serve problem 0 (``n_j = S_j`` × its output tiles), the next ``n_1`` problem 1, one
output tile and one split each, so the two reductions share a launch and their tiles run side by side.
``_finalize_kernel`` then sums the partials over ``s`` in a fixed order: deterministic, no atomics.

Each program runs ``_triton_common._reduce_tile``, the body of ``_lora_reduce_kernel`` (grad_A's
reduction in the fused variant; the two must agree on what grad_A is), so the tiling and precisions
are one code: fp32 products on the tensor cores in TF32 where
the low-rank precision allows, on the CUDA cores ("ieee") in short row steps and small tiles otherwise.
For half ``gy`` (``SPLIT_RHS``) the fp32 ``xa`` is split ``hi + lo``, each rounded to TF32, so that
``gyᵀ·xa`` keeps about 22 significant bits of ``xa`` (two TF32 products; ``gy`` itself is exact in TF32)
where one TF32 product keeps 11: the fused variant splits ``xa`` the same way in its grad_B partials.
All offsets are int64 (``M·K`` may exceed 2³¹). Compiled (``fastlora inspect``, triton 3.8, K = N =
4096, r = 16, bf16 and bf16+fp32, M 64 / 8192, dropout 0 / 0.1; 2026-12-03, after ``_lora_reduce_kernel``
became a ``_reduce_tile`` call): 176 registers on sm_90a, 242 with dropout, 168 on sm_80 either way;
``_lora_reduce_kernel`` 80–128; no stack, no local memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _prebound, _triton_common  # _triton_common._empty by attribute: the tests patch it to poison buffers
from ._device import device_limits
from ._triton_common import _NO_DROPOUT, _Dropout, _precisions, _reduce_layout, _reduce_tile, on_device


# seeds: a new value every call; specialising on them would compile for seed == 1 and % 16.
@triton.jit(do_not_specialize=["seed0", "seed1"])
def _grouped_reduce_kernel(
    lhs0, rhs0, ws0, cs0, programs0, M0, P0, Q0, rows0,
    slm0, slp0, srm0, srq0, sws0, swp0, swq0, scs0, scaling0, dropout_p0, seed0,
    lhs1, rhs1, ws1, cs1, M1, P1, Q1, rows1,
    slm1, slp1, srm1, srq1, sws1, swp1, swq1, scs1, scaling1, dropout_p1, seed1,
    HAS0: tl.constexpr, COL_SUM0: tl.constexpr, RHS_DROPOUT0: tl.constexpr, SPLIT_RHS0: tl.constexpr,
    PRECISION0: tl.constexpr, BLOCK_M0: tl.constexpr, BLOCK_P0: tl.constexpr, BLOCK_Q0: tl.constexpr,
    HAS1: tl.constexpr, COL_SUM1: tl.constexpr, RHS_DROPOUT1: tl.constexpr, SPLIT_RHS1: tl.constexpr,
    PRECISION1: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_Q1: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # problem 0's programs first (programs0 is 0 without it)
    if HAS0:
        if pid < programs0:
            _reduce_tile(
                lhs0, rhs0, ws0, cs0, pid, M0, P0, Q0, rows0, slm0, slp0, srm0, srq0, sws0, swp0, swq0, scs0,
                scaling0, dropout_p0, seed0,
                COL_SUM0, RHS_DROPOUT0, SPLIT_RHS0, PRECISION0, BLOCK_M0, BLOCK_P0, BLOCK_Q0,
            )  # fmt: skip
    if HAS1:
        if pid >= programs0:
            _reduce_tile(
                lhs1, rhs1, ws1, cs1, pid - programs0, M1, P1, Q1, rows1, slm1, slp1, srm1, srq1, sws1, swp1, swq1,
                scs1, scaling1, dropout_p1, seed1,
                COL_SUM1, RHS_DROPOUT1, SPLIT_RHS1, PRECISION1, BLOCK_M1, BLOCK_P1, BLOCK_Q1,
            )  # fmt: skip


class _Plan:
    """One problem of the launch: its tensors, partial buffers, tiling and kernel arguments."""

    __slots__ = ("args", "consts", "programs", "ws", "sums", "tensor_cores_wide")

    def __init__(self, lhs, rhs, scaling: float, dropout: _Dropout, col_sum: bool, precision: str, split_rhs: bool):
        M, P = lhs.shape
        Q = rhs.shape[1]
        # As _reduce_partials chooses them (_reduce_config: fp32 products on the CUDA cores spill with
        # 64-row steps or tiles over 2048 accumulators; on the tensor cores 4 warps spill tiles over
        # 4096 accumulators; the arch's reduce_rows; fewer rows with a dropout mask to draw).
        config, rows_per_split, grid = _reduce_layout(
            M, P, Q, precision, bool(dropout.p), col_sum, device_limits(lhs.device)
        )  # fmt: skip
        _, _, _, block_m, block_p, block_q, num_warps = config
        tiles, splits = grid[0] * grid[1], grid[2]
        self.ws = _triton_common._empty((splits, P, Q), torch.float32, lhs.device)
        self.sums = _triton_common._empty((splits, P), torch.float32, lhs.device) if col_sum else None
        cs = self.sums if col_sum else self.ws  # ws: a pointer never written
        self.programs = tiles * splits
        self.tensor_cores_wide = num_warps == 8
        self.args = [
            lhs, rhs, self.ws, cs, M, P, Q, rows_per_split, *lhs.stride(), *rhs.stride(), *self.ws.stride(),
            cs.stride(0), float(scaling * dropout.scale), float(dropout.p), dropout.seed,
        ]  # fmt: skip
        self.consts = (col_sum, bool(dropout.p), split_rhs, precision, block_m, block_p, block_q)


def grouped_reduce_partials(g_xa, x, gy, xa, scaling: float, dropout: _Dropout, need_A: bool, need_B: bool,
                            need_bias: bool):  # fmt: skip
    """One launch for the fp32 partials of grad_A (``need_A``: ``g_xa = gy B [M, R]``, ``x [M, K]``)
    and of grad_B / the bias (``gy [M, N]``, ``xa [M, R]``), M > 0 (module doc). Returns
    ``(ws_A [S0, R, K] or None, ws_B [S1, N, R] or None, sums [S1, N] or None)``, ``ws_A`` carrying
    ``scaling / (1 − p)`` and ``ws_B`` ``scaling``, for ``_triton_finalize.finalize_sums``."""
    plans = [None, None]
    if need_A:
        plans[0] = _Plan(g_xa, x, scaling, dropout, False, _precisions(x.dtype)[1], False)
    if need_B or need_bias:
        # grad_B's precision is the low-rank one of gy's dtype (TF32 for half gy, which then splits xa).
        half = gy.dtype != torch.float32
        plans[1] = _Plan(gy, xa, scaling, _NO_DROPOUT, need_bias, _precisions(gy.dtype)[1], half)
    present = [p for p in plans if p is not None]
    if not present:
        return None, None, None
    args = []
    for j, plan in enumerate(plans):
        if plan is None:  # an absent problem: no program reads these arguments (HAS_j is False)
            plan = present[0]
        args += plan.args[:4] + ([plans[0].programs if plans[0] is not None else 0] if j == 0 else []) + plan.args[4:]
    consts = {}
    for j, plan in enumerate(plans):
        (col_sum, drop, split_rhs, precision, block_m, block_p, block_q) = (plan or present[0]).consts
        consts.update({
            f"HAS{j}": plan is not None, f"COL_SUM{j}": col_sum, f"RHS_DROPOUT{j}": drop, f"SPLIT_RHS{j}": split_rhs,
            f"PRECISION{j}": precision, f"BLOCK_M{j}": block_m, f"BLOCK_P{j}": block_p, f"BLOCK_Q{j}": block_q,
        })  # fmt: skip
    # One warp count for both problems: 8 where either one's tile needs it on the tensor cores.
    num_warps = 8 if any(p.tensor_cores_wide for p in present) else 4
    with on_device(gy.device):
        # The row counts change with the batch: keyed by their specialisation only (_prebound).
        _prebound.launch(
            _grouped_reduce_kernel, (sum(p.programs for p in present),), tuple(args), {**consts, "num_warps": num_warps},
            gy.device, free=_FREE,
        )  # fmt: skip
    return (
        plans[0].ws if plans[0] is not None else None,
        plans[1].ws if plans[1] is not None and need_B else None,
        plans[1].sums if plans[1] is not None else None,
    )


_FREE = ("programs0", "M0", "rows0", "M1", "rows1")
