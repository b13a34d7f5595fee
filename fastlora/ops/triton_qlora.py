"""QLoRA: the fused LoRA linear layer over a 4-bit (NF4/FP4, bitsandbytes layout) base weight.

    forward : y      = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ,   xa = D(x) Aᵀ (fp32, saved for the backward)
    backward: grad_x = gy W + s·D((gy B) A),  grad_A = s·(gy B)ᵀ D(x),  grad_B = s·gyᵀ xa,  grad_b = Σ_m gy

The kernels are in ``_qlora_kernels`` (the dequantizing GEMM and the dropout pass; its doc gives
the layout read, the cost model and the dropout draws), their configs and pruning in
``_qlora_configs``; this module launches them and registers the ``fastlora::qlora_*`` ops, their
fakes and autograd. ``fastlora.qlora`` calls ``qlora_linear_2d``; ``fastlora inspect`` calls
``launch_for_inspection`` (the one op module of the 4-bit family).

The two adapter gradients (``s·lhsᵀ·rhs`` over the long M axis) and the bias gradient come from
``_triton_common._reduce_over_m``, the dense backend's deterministic split-M reduction (with its
``COL_SUM`` option for ``Σ_m gy``). Its operands are rank-r and ``[M, N]`` / ``[M, K]`` activations;
W is not involved.
"""

from __future__ import annotations

import torch

from . import _prebound, _triton_common  # _triton_common._empty by attribute: the tests patch it to poison buffers
from ._contract import autograd_pair, fake_grads
from ._qlora_configs import (  # noqa: F401  (GPU_CONFIGS ... re-exported: tests and tools look here)
    GPU_CONFIGS, LOW_RANK_GPU_CONFIGS, _qlora_low_rank, _qlora_matmul, prune_configs, prune_low_rank_configs,
)  # fmt: skip
from ._quant4bit import HALF_DTYPES, Quant4bit, code_table
from ._triton_common import (
    _NO_DROPOUT, INTERPRET, _Dropout, _dropout, _padded_rank, _precisions, _reduce_over_m, cdiv, next_pow2,
)  # fmt: skip


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
        num_n = cdiv(N, meta["BLOCK_N"]) if write_out else 1
        return (cdiv(M, meta["BLOCK_M"]) * num_n,)

    args = (
        a, q.packed, q.absmax, q.code, q.absmax2 if nested else q.absmax, q.code2 if nested else q.code,
        q.offset if nested else q.code,
        la, lb, bias if bias is not None else out_or_t, out_or_t, t if t is not None else out_or_t,
        M, N, K, R, next_pow2(M),
        *a.stride(), stride_wk, stride_wn, *la.stride(), *lb.stride(), *out_or_t.stride(), *t_strides,
        float(scaling), float(out_dropout.p), float(out_dropout.scale), out_dropout.seed,
    )  # fmt: skip
    kwargs = dict(
        QBLOCK=q.blocksize, QBLOCK2=q.blocksize2 if nested else 1, NESTED=nested,
        ROWS_ALIGNED=in_features % q.blocksize == 0, TRANSPOSED_W=transpose_w,
        HAS_BIAS=bias is not None, WRITE_OUT=write_out, STORE_T=t is not None and not t_given, T_GIVEN=t_given,
        R_PAD=_padded_rank(R), DROPOUT_OUT=bool(out_dropout.p), PRECISION=precision,
        LOW_RANK_PRECISION=low_rank_precision, UPCAST=INTERPRET and a.dtype == torch.bfloat16,
        FP32_ADAPTERS=la.dtype == torch.float32 and a.dtype != torch.float32,
    )  # fmt: skip
    with _triton_common.on_device(a.device):
        _prebound.launch(_qlora_matmul, grid, args, kwargs, a.device, free=("M",))


def _launch_low_rank(x, la, t, dropout: _Dropout) -> None:
    """``t [M, R] = D(x)·la`` in fp32 for ``x [M, K]``, ``la = Aᵀ [K, R]``: each element's mask drawn
    once (``_qlora_low_rank_kernel``), before the GEMM reads ``t``."""
    M, K = x.shape
    R = la.shape[1]
    precision, low_rank_precision = _precisions(x.dtype)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]),)

    args = (
        x, la, t, M, K, R, next_pow2(M), *x.stride(), *la.stride(), *t.stride(),
        float(dropout.p), float(dropout.scale), dropout.seed,
    )  # fmt: skip
    kwargs = dict(
        R_PAD=_padded_rank(R), PRECISION=precision, LOW_RANK_PRECISION=low_rank_precision,
        UPCAST=INTERPRET and x.dtype == torch.bfloat16,
        FP32_ADAPTERS=la.dtype == torch.float32 and x.dtype != torch.float32,
    )  # fmt: skip
    with _triton_common.on_device(x.device):
        _prebound.launch(_qlora_low_rank, grid, args, kwargs, x.device, free=("M",))


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
    blocks = cdiv(N * K, 64)
    q = Quant4bit(
        packed=torch.randint(0, 256, (cdiv(N * K, 2), 1), dtype=torch.uint8),
        absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8),
        code=code_table("nf4", "cpu"),
        absmax2=torch.rand(cdiv(blocks, 256)),
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
