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
producer's own K steps (``_recompute_t``) and stores it where the producer does (the same values),
so progress never depends on residency (the interpreter,
which runs programs one after another, takes this path for every consumer whose producer comes in
a later program). The flags are the only atomics: the arithmetic has none, and a tile's value does
not depend on which program computes it (deterministic).
The epilogue adds the low-rank term straight into the accumulator, ``acc = tl.dot(s·t, lb, acc)``,
on two ``BLOCK_N/2`` halves of the tile (fewer live registers), then the bias, and stores once.
DoRA's forward (``triton_forward_scaled``) multiplies the accumulator by its per-column factor
``m/n`` there, before the bias (``HAS_COL_SCALE``; in ``_split_k_reduce_kernel`` for decode).

Operands: where the architecture has TMA (``_device.arch_rules``: sm_90, sm_100, sm_120), with 2-D
row-major operands whose base and row strides are 16-byte aligned, ``a``, ``w`` and ``out`` go
through tensor descriptors (TMA loads/stores); otherwise (sm_80-89, strided or unaligned inputs) the
same source loads through pointers (cp.async on sm_80+). ``w`` is
always read in its stored layout ``W [N, K]``; ``W_TRANS`` says the forward reads it transposed.

grad_x also yields ``grad_B = scaling·gyᵀ xa`` and the bias gradient ``Σ_m gy`` while it streams
``gy`` (``FUSE_GRAD_B``): the K steps of row block ``pid_m`` are dealt out among its consumer tiles
(a grad_B-only tile is added where the grid has a single column), and the tile owning step ``k``
writes ``gy[rows, k]ᵀ·xa[rows]`` and ``Σ_rows gy[rows, k]`` as fp32 partials ``[num_m, N, R]`` /
``[num_m, N]`` (``num_m`` fixed before the launch). ``grad_A = scaling·(gy B)ᵀ D(x)`` is
``_lora_reduce_kernel``: M split across programs writing fp32 partials. One ``_finalize_kernel``
(``_triton_finalize``) then sums all three partial buffers over their leading axis in a fixed order,
scales and casts them into grad_A, grad_B and grad_bias: the backward is 3 launches, no memset and no
other ATen op (``_fused_backward`` says what several row slices add). So ``gy`` and ``x`` are each read
once by the backward; nothing is accumulated with atomics.

That fusion holds grad_x to small tiles (``GRAD_X_CONFIGS``: larger ones spilled), so there is a second
backward, ``"split"`` (``_split_backward``): the gy pass without ``FUSE_GRAD_B`` at the forward's
full tiles, then one ``_grouped_reduce_kernel`` launch (``_triton_grouped_reduce``) for the split-M
partials of grad_A, ``grad_B = scaling·gyᵀ·xa`` and ``Σ_m gy`` together, then the same finalize: 3
launches too, gy read twice. Which one runs is measured per problem on a GPU (both autotuned, then
both timed once, the faster kept for the process); under the interpreter it is ``"fused"``, and
``FASTLORA_TRITON_BACKWARD=fused|split|auto`` overrides (``_triton_backward_variants``).

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

import functools

import torch

from . import _host_programs, _prebound, _triton_common, _triton_finalize  # by attribute: the tests patch them
from ._contract import register_backend
from ._device import arch_rules, device_limits
from ._triton_common import (
    INTERPRET, INTERPRETER_CONFIGS, _Dropout, _dropout, _flag_dummy, _flag_workspace, _padded_rank, _precisions,
    _reduce_partials, cdiv, matmul_precision, next_pow2, on_device,
)  # fmt: skip
from . import _triton_backward_variants as _variants
from ._triton_finalize import finalize_sums
from ._triton_grouped_reduce import grouped_reduce_partials
from ._triton_lora_configs import (  # noqa: F401  (GPU_CONFIGS, GRAD_X_CONFIGS, prune_gemm_configs: the tests' and inspect's)
    _DECODE_MAX_M, _MAX_ACC_REGISTERS, GPU_CONFIGS, GRAD_X_CONFIGS, _acc_registers, _autotuned, _cuda_core_dots,
    _shared_bytes, prune_gemm_configs,
)  # fmt: skip
from ._triton_lora_kernels import (  # noqa: F401  (_lora_gemm_kernel: the tests')
    DROPOUT_ON_INPUT, DROPOUT_ON_LOW_RANK, NO_DROPOUT, _lora_gemm_kernel, _split_k_reduce_kernel,
)  # fmt: skip

# Bytes of fused grad_B partials one launch of the gy pass may write (see triton_backward), unless
# that leaves it fewer row blocks than this (very wide layers at high rank). 32 MiB keeps the anchor
# layer (M = 8192, K = N = 4096, r = 16) in one slice, so 3 launches, on sm_80 too (64-row blocks:
# 32 MiB of partials; with 16 MiB it took 2 slices, 5 launches): half the bytes of that layer's gy.
_MAX_PARTIAL_BYTES = 32 << 20
_MIN_PARTIAL_BLOCKS = 16

# Checks of its flag a consumer makes before it computes its row block's t itself. At about 0.5-1 µs
# an atomic round trip to L2, 1024 are 0.5-1 ms: over ten times a producer tile's K loop at LLM
# shapes (a consumer reaches its wait after its own K loop, its producer started no later), so a
# resident producer is waited for; a timeout costs the consumer one K loop of a·la (R_PAD/BLOCK_N
# of its tile's work), never a hang. Under the interpreter a wait that fails once cannot succeed
# (the producer's program runs later): two checks, which still run the loop.
_SPIN_LIMIT = 2 if INTERPRET else 1024

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


def _decode_splits(limits, M: int, N: int, K: int) -> int:
    """K splits that give every SM a share of w when the output alone has too few tiles (counting
    64-wide column blocks), with at least 512 columns of K a split."""
    tiles = cdiv(N, 64) * cdiv(M, 64)
    return max(1, min(limits.sm_count // tiles, K // 512, 16))


def _grad_b_block_m(M: int, R: int, device: torch.device, dtype: torch.dtype, *, dropout: bool) -> int:
    """Row block of the grad_x pass when it writes grad_B partials, fixed before the launch because
    the partials' buffer ``[cdiv(M, BLOCK_M), N, R]`` is allocated by it: the arch's rule
    (``arch_rules().grad_b_block``, where the figures are), by the padded rank and whether LoRA
    dropout (``dropout``) draws its mask in the epilogue. 128 rows only with wgmma/tcgen05 at r ≤ 32
    (with dropout: sm_90a at r = 16 only, sm_100a never), 32 rows with mma.sync at r ≥ 64."""
    if INTERPRET:
        return INTERPRETER_CONFIGS[0].kwargs["BLOCK_M"]
    return min(_grad_b_rows(R, dtype, matmul_precision(), dropout, device_limits(device)), max(16, next_pow2(M)))


@functools.lru_cache(maxsize=256)  # asked once a backward: ~2 µs computed, ~0.3 µs cached
def _grad_b_rows(R: int, dtype: torch.dtype, precision_setting: str, dropout: bool, limits) -> int:
    """``_grad_b_block_m``'s most rows (``precision_setting``: ``matmul_precision()``, which
    ``_precisions`` reads)."""
    if _cuda_core_dots(dtype, _precisions(dtype)[0]):  # only 32-row tiles kept off the stack there
        return 32
    return arch_rules(limits.capability).grad_b_block(_padded_rank(R), dropout)


def _launch_gemm(
    a, w, w_trans: bool, la, lb, bias, out, t, scaling: float, dropout: _Dropout, dropout_site,
    xa=None, grad_b_ws=None, bias_ws=None, block_m_fixed: int = 0, decode: bool = False, row0: int = 0,
    col_scale=None,
) -> None:  # fmt: skip
    """``out = a·w + scaling·D(a·la)·lb + bias`` and ``t = D(a·la)`` (fp32), for logical 2-D operands
    ``a [M, K]``, ``w [K, N]``, ``la [K, R]``, ``lb [R, N]``. ``w_trans``: ``w``, ``la`` and ``lb`` are
    given as the tensors whose transposes are those operands (the forward passes the stored ``W [N, K]``,
    ``A [R, K]``, ``B [N, R]`` as they are: no transposed views, about 1 µs of host time each); else as
    the operands themselves (grad_x: ``W``, ``B``, ``A``). ``out`` or ``t`` may be None (not written);
    ``grad_b_ws`` / ``bias_ws`` (with ``xa``) receive the fused grad_B / bias partials of ``aᵀ·xa`` /
    ``Σ a``; ``decode`` allows the split-K path for short ``a`` (the forward's dropout site only); ``a``
    holds rows ``row0…`` of the whole input (the dropout counter's row). ``col_scale`` (fp32 ``[N]``,
    contiguous; DoRA's ``m/n``) makes it ``out = col_scale ⊙ (a·w + scaling·D(a·la)·lb) + bias``, on
    the fp32 accumulator before the one store (in ``_split_k_reduce_kernel`` for split-K decode)."""
    M, K = a.shape
    if w_trans:
        N, R = w.shape[0], la.shape[0]
        sw1, sw0 = w.stride()
        sla1, sla0 = la.stride()
        slb1, slb0 = lb.stride()
    else:
        N, R = w.shape[1], la.shape[1]
        sw0, sw1 = w.stride()
        sla0, sla1 = la.stride()
        slb0, slb1 = lb.stride()
    device = a.device
    limits = device_limits(device)
    write_out, store_t = out is not None, t is not None
    # (K ≥ 1024: fewer columns never split, see _decode_splits; the call is skipped on the host path)
    splits = _decode_splits(limits, M, N, K) if decode and M <= _DECODE_MAX_M and K >= 1024 else 1
    split_k = splits > 1
    dummy = a  # a pointer argument the kernel never dereferences (flags excepted, see _flag_dummy)
    if split_k:
        out_buf = partials = _triton_common._empty((splits, M, N), torch.float32, device)
        t_buf = t_partials = _triton_common._empty((splits, M, R), torch.float32, device)
        out_strides = (*partials.stride()[1:], partials.stride(0))  # rows, columns, splits
        t_strides = (*t_partials.stride()[1:], t_partials.stride(0))
    else:
        out_buf, t_buf = out, t
        out_strides = (*out.stride(), 0) if write_out else (0, 0, 0)
        t_strides = (*t.stride(), 0) if store_t else (0, 0, 0)
    launcher = _lora_gemm_grad_x if grad_b_ws is not None else _lora_gemm
    # What the constexprs and the grid depend on beside the arguments' signature (see setup()).
    dropout_kind = dropout_site.value if dropout.p else NO_DROPOUT.value
    setup_key = (w_trans, dropout_kind, write_out, store_t, split_k, grad_b_ws is not None, bias_ws is not None,
                 bias is not None, col_scale is not None, matmul_precision(), limits)  # fmt: skip

    def setup():
        """The constexprs: functions of the arguments' shapes (but M's), strides, dtypes and
        alignments and of ``setup_key`` only (``_prebound.launch_keyed`` runs this once a signature)."""
        precision, low_rank_precision = _precisions(a.dtype)
        use_tma = _use_tma(device, a, w, None if split_k else out)  # w: W [N, K] as stored, either way
        return dict(
            HAS_BIAS=bias is not None, WRITE_OUT=write_out, STORE_T=store_t, SPLIT_K=split_k,
            FUSE_GRAD_B=grad_b_ws is not None, BIAS_GRAD=bias_ws is not None, SPLIT_XA=a.dtype != torch.float32,
            USE_TMA=use_tma, W_TRANS=w_trans, R_PAD=_padded_rank(R), DROPOUT=dropout_kind,
            PRECISION=precision, LOW_RANK_PRECISION=low_rank_precision,
            UPCAST=INTERPRET and a.dtype == torch.bfloat16,
            FP32_ADAPTERS=la.dtype == torch.float32 and a.dtype != torch.float32,
            HAS_COL_SCALE=col_scale is not None and not split_k,
        )  # fmt: skip

    programs = limits.sm_count

    def grid(meta):
        """Persistent grid: one program per SM at most. (Under the interpreter, programs run one after
        another: a consumer whose producer is in a later program times out and computes ``t`` itself.)"""
        num_n = cdiv(N, meta["BLOCK_N"]) if write_out else 1
        return (max(1, min(programs, cdiv(M, meta["BLOCK_M"]) * num_n * splits)),)

    with on_device(device):
        # A pair of int32 a row block (of 16 rows at least), zero before and after every launch.
        flags = _flag_workspace(device, 2 * cdiv(M, 16)) if write_out and store_t and not split_k else None
        tensors = (
            a, w, la, lb, dummy if bias is None else bias, out_buf if write_out else dummy,
            t_buf if store_t else dummy, _flag_dummy(device) if flags is None else flags,
            dummy if xa is None else xa, dummy if grad_b_ws is None else grad_b_ws,
            dummy if bias_ws is None else bias_ws, col_scale if col_scale is not None and not split_k else dummy,
        )  # fmt: skip
        sizes = (N, K, R, next_pow2(M), block_m_fixed, splits)
        strides = (
            *a.stride(), sw0, sw1, sla0, sla1, slb0, slb1, *out_strides, *t_strides,
            *((0, 0) if xa is None else xa.stride()),
            *((0, 0) if grad_b_ws is None else grad_b_ws.stride()[:2]),
            0 if bias_ws is None else bias_ws.stride(0),
        )  # fmt: skip
        args = (
            *tensors[:11], M, *sizes, row0, *strides,
            float(scaling), dropout.p, dropout.scale, dropout.seed, _SPIN_LIMIT, tensors[11],  # _Dropout: floats
        )  # fmt: skip
        # The site's signature (_prebound.launch_keyed): every int argument by value but the free row
        # counts M and row0 (keyed by their specialisation; the grid reads them) and the seed (by width).
        _prebound.launch_keyed(
            launcher, grid, args, (setup_key, sizes, strides, _SPIN_LIMIT), tensors, setup, device, free=_FREE_ROWS
        )  # fmt: skip
        if split_k:
            args = (
                partials, t_partials, lb, dummy if bias is None else bias, out, t,
                M, N, R, splits, slb0, slb1, *out.stride(), *t.stride(), float(scaling),
                dummy if col_scale is None else col_scale,
            )  # fmt: skip
            setup_k = lambda: _split_k_setup(R, col_scale is not None, bias is not None, a.dtype)  # noqa: E731
            grid = (cdiv(M, _SPLIT_K_BLOCK[0]), cdiv(N, _SPLIT_K_BLOCK[1]))
            _prebound.launch_keyed(
                _split_k_reduce_kernel, grid, args, (setup_key, a.dtype, args[7:16]), args[:6] + args[17:], setup_k,
                device, free=("M",),
            )  # fmt: skip


_FREE_ROWS = ("M", "row0")
_SPLIT_K_BLOCK = (16, 64)


def _split_k_setup(R, has_col_scale, has_bias, dtype):
    """Constexprs of ``_split_k_reduce_kernel`` (see ``_launch_gemm``'s ``setup``)."""
    return dict(
        HAS_BIAS=has_bias, R_PAD=_padded_rank(R), LOW_RANK_PRECISION=_precisions(dtype)[1],
        BLOCK_M=_SPLIT_K_BLOCK[0], BLOCK_N=_SPLIT_K_BLOCK[1], HAS_COL_SCALE=has_col_scale,
    )  # fmt: skip


def triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    if not x.shape[0]:
        return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, None)
    seed_value, scalars = _program_scalars(scaling, dropout_p, seed)
    with on_device(x.device):
        # Replayed from its host program after the first planned call of this structure (_host_programs).
        return _host_programs.run(
            "forward", lambda: _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, None),
            (x, weight, bias, lora_A, lora_B), scalars, seed_value, x.device,
        )  # fmt: skip


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale):
    """``triton_forward``, with DoRA's column factor in the epilogue where ``col_scale`` is given."""
    M = x.shape[0]
    y = _triton_common._empty((M, weight.shape[0]), x.dtype, x.device)
    xa = _triton_common._empty((M, lora_A.shape[0]), torch.float32, x.device)
    if M:
        _launch_gemm(  # (one on_device in it for both launches of a split-K decode)
            x, weight, True, lora_A, lora_B, bias, y, xa, scaling, _dropout(dropout_p, seed), DROPOUT_ON_INPUT,
            decode=True, col_scale=col_scale,
        )  # fmt: skip
    return y, xa


def triton_forward_scaled(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale):
    """``(y, xa)`` with ``y = col_scale ⊙ (x Wᵀ + scaling·D(x) Aᵀ Bᵀ) + bias`` (DoRA's forward,
    ``col_scale = m/n`` ``[N]``) in one pass: the factor is applied to the fp32 accumulator in the
    epilogue (the split-K reduce for decode) and y rounded once; ``xa = D(x) Aᵀ`` as in
    ``triton_forward``. ``col_scale`` is read as contiguous fp32 (cast here if it is not)."""
    N = weight.shape[0]
    if not isinstance(col_scale, torch.Tensor) or col_scale.shape != (N,) or col_scale.device != x.device:
        got = (tuple(col_scale.shape), col_scale.device) if isinstance(col_scale, torch.Tensor) else type(col_scale).__name__
        raise ValueError(f"triton_forward_scaled: col_scale must be a [{N}] tensor on {x.device}, got {got}")
    if not col_scale.is_floating_point():
        raise TypeError(f"triton_forward_scaled: col_scale must be floating point, got {col_scale.dtype}")
    col_scale = col_scale.to(torch.float32).contiguous()
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale)


def triton_backward(
    gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias, placeholders=True
):
    """The backward, in the variant ``_triton_backward_variants`` picks for the problem ("fused" or
    "split", see ``_fused_backward`` / ``_split_backward``): measured on a GPU, ``fused`` under the
    interpreter, ``FASTLORA_TRITON_BACKWARD`` overriding. The two differ only in where grad_B and the
    bias gradient are reduced, so there is a choice only when one of them is needed (and M > 0)."""
    M = gy.shape[0]
    # (Checked without a Python call: CPU tensors reach here only under the interpreter, or with the
    # launches stubbed (the census, which counts the default variant's host path; fastlora inspect,
    # which runs both variants itself).)
    args = (gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias)
    with on_device(x.device):  # once for the backward's launches (each site's own is then a no-op)
        split = M and (need_B or need_bias) and (x.is_cuda or INTERPRET) and _backward_variant(args) == "split"
        body = _split_backward if split else _fused_backward
        # (The op's outputs must be tensors, placeholders included; the split variant's grouped
        # reduction takes the generic launch path, which host programs do not replay.)
        if placeholders or not M or split:
            return body(*args, placeholders)
        # The eager Function's backward, replayed from its host program (_host_programs) after the
        # first planned call of this structure.
        seed_value, scalars = _program_scalars(scaling, dropout_p, seed, need_x, need_A, need_B, need_bias)
        return _host_programs.run(
            "fused backward", lambda: body(*args, False), (gy, x, xa, weight, lora_A, lora_B), scalars, seed_value,
            x.device,
        )  # fmt: skip


def _program_scalars(scaling, dropout_p, seed, *flags) -> tuple[int, tuple]:
    """``(seed, scalars)`` of a host program (``_host_programs.run``): the int the kernels' seed
    parameters receive (0 without dropout), and every value but the tensors that the body's launches
    depend on: scaling, p, the seed's width, ``flags``, and the module values the bodies read (read
    per call: the tests patch some of them), the launchers included (a test's spy in place of one must
    see its launches: a key with a spy is never replayed)."""
    seed_value = int(seed) if dropout_p else 0
    constants = (
        INTERPRET, _SPIN_LIMIT, _DECODE_MAX_M, _MAX_PARTIAL_BYTES, _MIN_PARTIAL_BLOCKS, id(_lora_gemm),
        id(_lora_gemm_grad_x), id(_split_k_reduce_kernel), id(_triton_common._lora_reduce_kernel),
        id(_triton_finalize._finalize_kernel),
    )  # fmt: skip
    return seed_value, (float(scaling), float(dropout_p), _prebound._width(seed_value), *flags, constants)


def _eager_backward(*args):
    """``triton_backward`` for the eager Function, which drops the gradients it was not asked for:
    None there instead of empty placeholder tensors (an allocation each, about 1.5 µs of host time;
    the op must return tensors)."""
    return triton_backward(*args, placeholders=False)


def _backward_variant(args) -> str:
    """``"fused"`` or ``"split"`` for one backward (``_triton_backward_variants``' module doc)."""
    mode = _variants.requested()
    if mode != "auto":
        return mode
    gy, x, _, _, lora_A, lora_B, _, dropout_p, _, need_x, need_A, need_B, need_bias = args
    if x.device.type not in _variants.TIMED_DEVICE_TYPES or torch.are_deterministic_algorithms_enabled():
        # The interpreter: nothing to time. Deterministic mode: the variants round differently, and a
        # measured choice could differ between processes (``"auto"`` picks torch there for the same reason).
        return _variants.UNTIMED_DEFAULT
    M, N = gy.shape
    # What the variants' speeds depend on: the autotuners' keys (M's power-of-two bucket, R_PAD, ...;
    # computed inline, no triton.next_power_of_2 wrappers on a path every backward takes) and the
    # device (its index: one GPU model, one SM count).
    r_pad = max(16, 1 << (lora_A.shape[0] - 1).bit_length())
    key = (
        (M - 1).bit_length(), N, x.shape[1], r_pad, x.dtype, gy.dtype, lora_A.dtype, lora_B.dtype, bool(dropout_p),
        need_x, need_A, need_B, need_bias, matmul_precision(), x.get_device(),
    )  # fmt: skip
    return _variants.choose(key, x.device, lambda variant: _BACKWARDS[variant](*args))


def _fused_backward(
    gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias, placeholders=True
):
    """The "fused" variant. Launches (no memset, no ATen op but allocations): the gy pass (grad_x,
    ``t = gy B`` and the fused grad_B / bias partials), ``_lora_reduce_kernel`` (grad_A's split-M
    partials) and one ``_finalize_kernel`` that sums every partial buffer, scales and casts into grad_A,
    grad_B and grad_bias: 3 while the grad_B partials of all M rows fit ``_MAX_PARTIAL_BYTES`` (one row
    slice; M = 8192 at K = N = 4096, r = 16), fewer for fewer gradients. With S row slices, ``2·S + 1``:
    each slice but the last is followed by a finalize launch that adds its partials to fp32 running
    sums (slice order, then row-block order: deterministic), which the last one reads."""
    M, N = gy.shape
    R = lora_A.shape[0]
    dropout = _dropout(dropout_p, seed)
    grad_x = _triton_common._empty(x.shape, x.dtype, x.device) if need_x else _placeholder(x, placeholders)
    # gy B feeds grad_A, and grad_x's epilogue: its consumers read it from this buffer.
    g_xa = _triton_common._empty((M, R), torch.float32, x.device) if need_A or need_x else None
    if M == 0:
        grad_A = torch.zeros_like(lora_A) if need_A else lora_A.new_empty((0,))
        grad_B = torch.zeros_like(lora_B) if need_B else lora_B.new_empty((0,))
        grad_bias = gy.new_zeros((N,)) if need_bias else gy.new_empty((0,))
        return grad_x, grad_A, grad_B, grad_bias
    block_m = _grad_b_block_m(M, R, x.device, x.dtype, dropout=bool(dropout.p)) if need_B or need_bias else 0
    # The grad_B partials take cdiv(rows, block_m)·N·R fp32: rows go in launches that keep them within
    # _MAX_PARTIAL_BYTES (at r = 64, 64-row blocks, all of M = 8192 at once would take 128 MiB).
    rows = max(_MIN_PARTIAL_BLOCKS, _MAX_PARTIAL_BYTES // (4 * N * R)) * block_m if block_m else M
    row_blocks = cdiv(min(rows, M), block_m) if block_m else 0
    grad_b_ws = _triton_common._empty((row_blocks, N, R), torch.float32, x.device) if block_m else None
    bias_ws = _triton_common._empty((row_blocks, N), torch.float32, x.device) if need_bias else None
    # (Placeholders only for the gradients not asked for: an allocation is ~1 µs of host time.)
    grad_B = (
        _triton_common._empty(lora_B.shape, lora_B.dtype, x.device) if need_B else _placeholder(lora_B, placeholders)
    )  # fmt: skip
    grad_bias = _triton_common._empty((N,), gy.dtype, x.device) if need_bias else _placeholder(gy, placeholders)
    several = rows < M
    # fp32 running sums of the slices before the last (only with several slices).
    run_B = _triton_common._empty((N, R), torch.float32, x.device) if several and need_B else None
    run_bias = _triton_common._empty((N,), torch.float32, x.device) if several and need_bias else None
    jobs = []
    for m0 in range(0, M, rows):
        m1 = min(m0 + rows, M)
        blocks = cdiv(m1 - m0, block_m) if block_m else 0
        # Row slices only with several (a view is ~1 µs of host time, and one slice is the usual case).
        cut = (lambda t: t[m0:m1]) if several else (lambda t: t)  # noqa: E731
        _launch_gemm(
            cut(gy), weight, False, lora_B, lora_A, None, cut(grad_x) if need_x else None,
            cut(g_xa) if g_xa is not None else None, scaling, dropout, DROPOUT_ON_LOW_RANK,
            xa=cut(xa), grad_b_ws=grad_b_ws, bias_ws=bias_ws, block_m_fixed=block_m, row0=m0,
        )  # fmt: skip
        last = m1 == M
        jobs = []  # (partials, out, scale, running sums to add or None): see _triton_finalize
        if need_B:
            out_B = grad_B if last else run_B
            parts = grad_b_ws[:blocks] if several else grad_b_ws
            jobs.append((parts, out_B, scaling if last else 1.0, run_B if m0 else None))
        if need_bias:
            out_bias = grad_bias if last else run_bias
            jobs.append((bias_ws[:blocks] if several else bias_ws, out_bias, 1.0, run_bias if m0 else None))
        if not last:  # grad_b_ws / bias_ws are refilled by the next slice
            finalize_sums(jobs)
    if need_A:  # (the partials carry the scaling)
        grad_A = _triton_common._empty(lora_A.shape, lora_A.dtype, x.device)
        jobs.append((_reduce_partials(g_xa, x, scaling, dropout)[0], grad_A, 1.0, None))
    else:
        grad_A = _placeholder(lora_A, placeholders)
    finalize_sums(jobs)
    return grad_x, grad_A, grad_B, grad_bias


def _split_backward(
    gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias, placeholders=True
):
    """The "split" variant, for M > 0 with grad_B or the bias gradient needed. Launches (no memset, no
    ATen op but allocations): the gy pass without the fused partials (grad_x and ``t = gy B`` at the
    forward's full tiles, ``GPU_CONFIGS`` pruned as for the forward; skipped when neither grad_x nor
    grad_A is needed), ``_grouped_reduce_kernel`` (the split-M partials of grad_A, grad_B and the bias
    in one grid) and one ``_finalize_kernel``: 3. No row slices: the partials take a few split rows."""
    M, N = gy.shape
    R = lora_A.shape[0]
    dropout = _dropout(dropout_p, seed)
    grad_x = _triton_common._empty(x.shape, x.dtype, x.device) if need_x else _placeholder(x, placeholders)
    g_xa = _triton_common._empty((M, R), torch.float32, x.device) if need_A or need_x else None
    if g_xa is not None:
        _launch_gemm(
            gy, weight, False, lora_B, lora_A, None, grad_x if need_x else None, g_xa, scaling, dropout,
            DROPOUT_ON_LOW_RANK,
        )  # fmt: skip
    ws_A, ws_B, sums = grouped_reduce_partials(g_xa, x, gy, xa, scaling, dropout, need_A, need_B, need_bias)
    grad_A, grad_B, grad_bias = (_placeholder(t, placeholders) for t in (lora_A, lora_B, gy))
    jobs = []  # (partials, out, scale, running sums or None): the partials carry the scalings
    if need_A:
        grad_A = _triton_common._empty(lora_A.shape, lora_A.dtype, x.device)
        jobs.append((ws_A, grad_A, 1.0, None))
    if need_B:
        grad_B = _triton_common._empty(lora_B.shape, lora_B.dtype, x.device)
        jobs.append((ws_B, grad_B, 1.0, None))
    if need_bias:
        grad_bias = _triton_common._empty((N,), gy.dtype, x.device)
        jobs.append((sums, grad_bias, 1.0, None))
    finalize_sums(jobs)
    return grad_x, grad_A, grad_B, grad_bias


def _placeholder(like: torch.Tensor, placeholders: bool):
    """What a backward returns for a gradient it was not asked for: an empty tensor (the op's
    contract), or None for the eager Function (``_eager_backward``)."""
    return like.new_empty((0,)) if placeholders else None


_BACKWARDS = {"fused": _fused_backward, "split": _split_backward}


def launch_for_inspection(
    M: int, K: int, N: int, r: int, dtype: torch.dtype, adapter_dtype: torch.dtype, dropout: bool, backward: bool
) -> None:
    """Run the launchers on CPU tensors of one problem, exactly as a real call launches them (the
    forward, and if ``backward`` both variants of the backward, which a GPU times against each
    other), for ``fastlora inspect`` to intercept."""
    x = torch.randn(M, K, dtype=dtype)
    weight = torch.randn(N, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    lora_A = torch.randn(r, K, dtype=adapter_dtype)
    lora_B = torch.randn(N, r, dtype=adapter_dtype)
    p, seed = (0.1, torch.tensor(0)) if dropout else (0.0, None)
    y, xa = triton_forward(x, weight, bias, lora_A, lora_B, 1.0, p, seed)
    if backward:
        gy = torch.randn_like(y)
        for backward_variant in _BACKWARDS.values():
            backward_variant(gy, x, xa, weight, lora_A, lora_B, 1.0, p, seed, True, True, True, True)


TRITON_OPS = register_backend(
    "triton", triton_forward, triton_backward, runs_on=("cuda", "cpu") if INTERPRET else ("cuda",),
    eager_backward=_eager_backward,
)
