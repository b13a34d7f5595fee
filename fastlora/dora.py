"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) on fastlora's fused LoRA ops.

PEFT's ``DoraLinearLayer`` computes, with ``g = m / n`` per output column::

    y = x Wᵀ + b + (g − 1) ⊙ base + g ⊙ s·(D(x) Aᵀ) Bᵀ
    n_j = ‖W_j + s·B_j A‖   (detached: no gradient flows through n, DoRA §4.3)
    base = x Wᵀ, or D(x) Wᵀ with LoRA dropout in training (a second base GEMM)

Shapes: ``x [M, K]``, ``W [N, K]``, ``b [N]``, ``A [r, K]``, ``B [N, r]``, ``m [N]``.

Without dropout (eval, or ``p = 0``) this is ``y = g ⊙ pre + b`` with ``pre = x Wᵀ + s·(x Aᵀ) Bᵀ``,
which on the triton backend is one pass of the fused forward kernel with ``g`` and ``b`` applied in
its epilogue on the fp32 accumulator (y rounded once), and on the others the backend's fused op with
``bias=None`` followed by one elementwise pass that scales the columns by ``g`` and adds ``b`` in
place on the output (``_scaled_forward``). The backward feeds ``gy ⊙ g`` to the backend's LoRA
backward (grad_x, grad_A, grad_B) and takes ``grad_m_j = Σ_i gy_ij pre_ij / n_j`` from the saved
output: ``pre_ij / n_j = (y_ij − b_j) / m_j``, so neither a copy of ``pre`` nor a second base GEMM
is needed: ``Σ_i gy·(y − b) / m`` costs two passes over M×N (three with a bias), and on the
triton backend one kernel pass (``fastlora.ops.dora_triton``) that also writes ``gy ⊙ g``. The
price of recovering ``pre`` from y: where ``|b_j| ≫ |y_j − b_j|`` the rounding of y (in its dtype)
is amplified by ``|b_j| / |y_j − b_j|``, as in PEFT's own ``result − bias``. A column with
``m_j = 0`` has lost ``pre`` (``y_j = b_j``): its ``grad_m_j`` is recomputed from ``x W_jᵀ + s·xa B_jᵀ`` (a GEMM over those rows only). Whether there is such a
column is read without a host sync: the forward copies ``any(m == 0)`` to pinned host memory
asynchronously and the backward reads it. Under CUDA-graph capture the forward saves ``pre``.

With dropout in training, PEFT's ``base = D(x) Wᵀ`` makes ``y = (x − D(x)) Wᵀ + b + g ⊙ pre(D(x))``:
a second base GEMM in the forward and in the backward (``grad_x`` needs ``gy W`` and ``(gy⊙g) W``),
as PEFT. That path is an autograd composition and saves ``pre`` (M×N) and the dropout scale.

The norm uses the low-rank identity ``‖W_j + s B_j A‖² = ‖W_j‖² + 2s·B_j·(A W_jᵀ) + s²·B_j (A Aᵀ) B_jᵀ``:
``‖W_j‖²`` is computed once per frozen weight (``WeightNormCache``, which recomputes it when the
weight's ``data_ptr``, ``_version``, shape or dtype changes: ``merge``, ``load_state_dict``, an
in-place edit; an edit through ``.data`` bypasses the version counter: call ``invalidate()``), and
``W Aᵀ`` (N×r) is one pass over W per step. No N×K or K×K tensor is built. The identity sums a
cross term that can be negative, so where ``W_j + s·B_j A`` nearly cancels, ``n_j`` has a relative
error of about ``eps·‖W_j‖² / n_j²``: the terms are formed in float32 and combined in float64.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_dropout, check_lora_inputs
from .ops._contract import wide_dtype
from .ops.dispatch import backend_ops, resolve_backend

_HALF = (torch.float16, torch.bfloat16)
_SEED_BOUND = 2**31 - 1
# W is upcast for the W Aᵀ product in row chunks of at most this many elements (CPU, or no mm out_dtype).
_CHUNK_ELEMENTS = 1 << 20


def _row_chunk(weight: torch.Tensor) -> int:
    """Rows of W upcast at a time: at most ``_CHUNK_ELEMENTS`` elements and half of W, so that no
    upcast copy of the whole of W is made."""
    N, K = weight.shape
    return max(1, min((N + 1) // 2, _CHUNK_ELEMENTS // max(K, 1)))


def _exact(device: torch.device) -> torch.dtype:
    """The dtype the N- and r-sized norm terms are combined in: float64 (MPS has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


class WeightNormCache:
    """``‖W_j‖²`` for each row j of a frozen weight ``[N, K]``, computed once and reused while the
    weight is unchanged (same ``data_ptr``, ``_version``, shape, strides, dtype, device)."""

    def __init__(self):
        self._key, self._value = None, None

    def invalidate(self) -> None:
        self._key, self._value = None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), weight.dtype, weight.device)
        if key != self._key:
            with torch.no_grad():
                # Once per weight (not per step), in float64, a row chunk at a time (no N×K upcast copy).
                w, exact, rows = weight.detach(), _exact(weight.device), _row_chunk(weight)
                value = torch.empty(w.shape[0], dtype=exact, device=w.device)
                for i in range(0, w.shape[0], rows):
                    torch.sum(w[i : i + rows].to(exact).square(), dim=1, out=value[i : i + rows])  # never in place on W
            if weight.is_cuda and _capturing(weight.device):
                # Inside a CUDA-graph capture the kernels above are recorded, not run: `value` holds
                # its numbers only once the graph replays. Caching it would hand garbage norms to an
                # eager call made before the first replay, so a captured call keeps it to itself.
                return value
            self._value = value
            self._key = key
        return self._value


def _w_at(weight: torch.Tensor, lora_A: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """``W Aᵀ`` ``[N, r]`` in ``wide``, one pass over W, without an N×K upcast copy of W."""
    A = lora_A.detach()
    if weight.dtype == wide:
        return torch.mm(weight, A.to(wide).t())
    if weight.is_cuda and weight.dtype in _HALF:
        # A = hi + lo, both in W's dtype: a 2r-row GEMM with fp32 output keeps ~16 bits of A.
        A32 = A.float()
        hi = A32.to(weight.dtype)
        both = torch.mm(weight, torch.cat([hi, (A32 - hi).to(weight.dtype)]).t(), out_dtype=torch.float32)
        r = A.shape[0]
        return (both[:, :r] + both[:, r:]).to(wide)
    N, rows = weight.shape[0], _row_chunk(weight)
    out = torch.empty(N, A.shape[0], device=weight.device, dtype=wide)
    A_wide = A.to(wide).t()
    for i in range(0, N, rows):
        torch.mm(weight[i : i + rows].to(wide), A_wide, out=out[i : i + rows])
    return out


def weight_norm(weight, lora_A, lora_B, scaling: float, cache: WeightNormCache | None = None) -> torch.Tensor:
    """``n_j = ‖W_j + scaling·B_j A‖`` ``[N]``, detached, in ``wide_dtype(weight.dtype)`` (float32;
    float64 for float64), from the low-rank identity (module doc)."""
    with torch.no_grad():
        exact = _exact(weight.device)
        sq_w = (cache or WeightNormCache()).get(weight)
        wa = _w_at(weight, lora_A, wide_dtype(weight.dtype)).to(exact)
        A, B = lora_A.detach().to(exact), lora_B.detach().to(exact)
        gram = torch.mm(A, A.t())  # r×r
        sq = sq_w + (2 * scaling) * (B * wa).sum(1) + (scaling * scaling) * (torch.mm(B, gram) * B).sum(1)
        return sq.clamp_min_(0).sqrt_().to(wide_dtype(weight.dtype))


def _scaled_forward(ops, x, weight, bias, lora_A, lora_B, scaling, scale):
    """``(y, xa)``: ``y = scale ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``. On the triton backend (eagerly) one
    kernel pass: the factor and the bias are applied in the forward kernel's epilogue on the fp32
    accumulator and y is rounded once (``triton_lora.triton_forward_scaled``). Elsewhere the
    backend's fused op and one in-place elementwise pass on its output (rounded twice in half
    precision). Either way the stored y is ``scale ⊙ pre + b`` as ``_grad_magnitude`` recovers it."""
    if ops.scaled is not None:
        return ops.scaled(x, weight, bias, lora_A, lora_B, scaling, 0.0, None, scale)
    pre, xa = ops.forward(x, weight, None, lora_A, lora_B, scaling, 0.0, None)
    if bias is None:
        return pre.mul_(scale), xa
    return torch.addcmul(bias, pre, scale, out=pre), xa


def _zero_flag(magnitude: torch.Tensor):
    """``any(m == 0)`` on the host, without a sync: a pinned tensor filled by an async copy, and
    the event to wait on (None on the CPU)."""
    flag = (magnitude.detach() == 0).any()
    if not magnitude.is_cuda:
        return flag, None
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)  # on the current stream of m's device
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(magnitude.device))  # that stream, not the current device's
    return host, event


class _Impls(NamedTuple):
    forward: Callable
    backward: Callable
    scaled: Callable | None = None  # DoRA's forward with the column factor fused (``_scaled_forward``)


def _impls(name: str) -> _Impls:
    """Backend ``name``'s forward/backward as ``LoRAOps`` defines them (module doc of ``ops._contract``).
    Eagerly the Python implementations themselves: calling the ``torch.library`` op from Python
    costs about 40 µs and imports torch._dynamo (and with it triton) on first use; under
    ``torch.compile`` the ops, which the compiler traces."""
    ops = backend_ops(name)
    if torch.compiler.is_compiling():
        return _Impls(ops.forward, ops.backward)
    if name == "torch":
        from .ops.torch_lora import torch_backward, torch_forward

        return _Impls(torch_forward, torch_backward)
    if name == "triton":
        from .ops.triton_lora import triton_backward, triton_forward, triton_forward_scaled

        return _Impls(triton_forward, triton_backward, triton_forward_scaled)
    return _Impls(ops.forward, ops.backward)  # cuda: C++ ops, dispatched without Python


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` (not of the current device) is capturing a CUDA graph."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class _DoRAFunction(torch.autograd.Function):
    """``y = (m/n) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b`` for 2-D x on one backend's ops, W frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, ops, backend):
        scale = magnitude.detach().to(norm.dtype) / norm
        need_m = ctx.needs_input_grad[5]
        capturing = x.is_cuda and _capturing(x.device)
        pre = None
        if need_m and capturing:  # the host cannot read a flag during capture: keep pre instead
            y, xa = ops.forward(x, weight, None, lora_A, lora_B, scaling, 0.0, None)
            pre, y = y, (torch.addcmul(bias, y, scale) if bias is not None else y * scale).to(y.dtype)
        else:
            y, xa = _scaled_forward(ops, x, weight, bias, lora_A, lora_B, scaling, scale)
        ctx.flag = _zero_flag(magnitude) if need_m and pre is None else None
        ctx.save_for_backward(x, xa, weight, bias, lora_A, lora_B, magnitude, norm, scale, y if pre is None else pre)
        ctx.scaling, ctx.ops, ctx.saved_pre = scaling, ops, pre is not None
        # triton: gy·g and Σ gy·y in one pass over gy and y (fastlora.ops.dora_triton)
        ctx.prologue_kernel = backend == "triton" and pre is None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, xa, weight, bias, lora_A, lora_B, magnitude, norm, scale, y = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        wide = norm.dtype
        with torch.autocast(gy.device.type, enabled=False):
            grad_x = grad_A = grad_B = grad_bias = grad_m = dot = gy_sum = None
            if ctx.prologue_kernel:
                from .ops.dora_triton import dora_grad_prologue

                gy_s, dot, gy_sum = dora_grad_prologue(gy, y, scale, bias is not None and (need_m or need_bias))
            elif need_x or need_A or need_B:
                # one pass, in gy's dtype (the product is formed in float32 and rounded once)
                gy_s = torch.mul(gy, scale, out=torch.empty_like(gy, memory_format=torch.contiguous_format))
            if need_x or need_A or need_B:
                grad_x, grad_A, grad_B, _ = ctx.ops.backward(
                    gy_s, x, xa, weight, lora_A, lora_B, ctx.scaling, 0.0, None, need_x, need_A, need_B, False
                )
            if need_bias:
                grad_bias = (gy_sum if gy_sum is not None else gy.sum(0, dtype=wide)).to(bias.dtype)
            if need_m:
                grad_m = _grad_magnitude(ctx, gy, x, xa, weight, bias, lora_B, magnitude, norm, y, dot, gy_sum)
        return (
            grad_x if need_x else None, None, grad_bias,
            grad_A if need_A else None, grad_B if need_B else None, grad_m, None, None, None, None,
        )  # fmt: skip


def _grad_magnitude(ctx, gy, x, xa, weight, bias, lora_B, magnitude, norm, saved, dot=None, gy_sum=None):
    """``grad_m_j = Σ_i gy_ij pre_ij / n_j``, from the saved ``pre`` or from the output ``y``."""
    wide = norm.dtype
    if ctx.saved_pre:
        return (saved.to(wide, copy=True).mul_(gy).sum(0) / norm).to(magnitude.dtype)
    # pre/n = (y − b)/m, so Σ_i gy·pre/n = (Σ_i gy·y − b·Σ_i gy)/m: one product in y's dtype and
    # float32 sums (two passes over M×N, three with a bias), never in place on the saved y.
    if dot is None:  # else the prologue kernel's (fp32 products)
        dot = torch.mul(gy, saved).sum(0, dtype=wide)
    if bias is not None:
        dot = dot - bias.to(wide) * (gy_sum if gy_sum is not None else gy.sum(0, dtype=wide))
    m = magnitude.detach().to(wide)
    grad = dot / torch.where(m == 0, 1, m)
    flag, event = ctx.flag
    if event is not None:
        event.synchronize()  # recorded in the forward: long done by now
    if bool(flag):
        (cols,) = (m == 0).nonzero(as_tuple=True)
        pre = torch.mm(x.to(wide), weight[cols].to(wide).t()).addmm_(xa, lora_B[cols].to(wide).t(), alpha=ctx.scaling)
        grad[cols] = (pre * gy[:, cols].to(wide)).sum(0) / norm[cols]
    return grad.to(magnitude.dtype)


def dropout_scale(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``mask / (1 − p)`` in x's shape and dtype, ``mask ~ Bernoulli(1 − p)`` from a generator seeded
    with ``seed``: the LoRA dropout of DoRA's training path (a test can regenerate it)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=generator)
    return keep.mul_(1 / (1 - p)) if p < 1 else keep


def _composed(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout, backend):
    """DoRA by autograd composition (dropout in training, a W that requires grad, autocast), as
    PEFT computes it: ``y = (x − D(x)) Wᵀ + b + g ⊙ pre(D(x))``."""
    from .functional import lora_linear

    scale = magnitude.to(norm.dtype) / norm
    if dropout:
        seed = int(torch.randint(_SEED_BOUND, (), dtype=torch.int64))
        x_low_rank = x * dropout_scale(x, dropout, seed)
        rest = F.linear(x - x_low_rank, weight, bias)  # PEFT's second base GEMM: (x − D(x)) Wᵀ + b
    else:
        x_low_rank, rest = x, bias
    pre = lora_linear(x_low_rank, weight, None, lora_A, lora_B, scaling, backend=backend)
    y = pre * scale if rest is None else torch.addcmul(rest, pre, scale)
    return y.to(pre.dtype)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    *,
    dropout: float = 0.0,
    backend: str = "auto",
    cache: WeightNormCache | None = None,
) -> torch.Tensor:
    """DoRA's ``y`` (module doc), differentiable in x, A, B, m (and b, W where they require grad).

    Shapes: ``x [..., K]``, ``weight [N, K]`` (frozen), ``bias [N]`` or None, ``lora_A [r, K]``,
    ``lora_B [N, r]``, ``magnitude [N]``; returns ``[..., N]`` in x's dtype. ``dropout`` is LoRA
    dropout in training (pass 0 in eval); ``cache`` keeps ``‖W_j‖²`` between calls (one per weight).
    """
    if not isinstance(magnitude, torch.Tensor) or magnitude.shape != (weight.shape[0],):
        got = tuple(magnitude.shape) if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__
        raise ValueError(f"DoRA magnitude must have shape ({weight.shape[0]},) (out_features), got {got}")
    if not magnitude.is_floating_point() or magnitude.device != weight.device:
        raise TypeError(f"DoRA magnitude must be a floating tensor on {weight.device}, got {magnitude.dtype} on {magnitude.device}")
    scaling = check_lora_inputs(x, weight, bias, lora_A, lora_B, scaling)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    dropout = check_dropout(dropout)
    norm = weight_norm(weight, lora_A, lora_B, scaling, cache)
    autocast = x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
    if dropout or autocast or weight.requires_grad:
        y = _composed(x2, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout, backend)
    else:
        name = resolve_backend(backend, x2, weight, None, lora_A, lora_B, 0.0)
        y = _DoRAFunction.apply(x2, weight, bias, lora_A, lora_B, magnitude, norm, scaling, _impls(name), name)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


# --- merge / unmerge (PEFT's DoRA merge: W' = g ⊙ (W + s·B A), g from the unmerged W) -------------


@torch.no_grad()
def merge_weight(weight, lora_A, lora_B, magnitude, scaling: float) -> torch.Tensor:
    """Merge in place: ``W ← (m/n) ⊙ (W + s·B A)``; returns ``m/n`` ``[N]`` (float32/64), which
    ``unmerge_weight`` needs (n is that of the unmerged W, as PEFT caches it)."""
    norm = weight_norm(weight, lora_A, lora_B, scaling)
    scale = magnitude.detach().to(norm.dtype) / norm
    wide = torch.promote_types(weight.dtype, torch.float32)
    merged = torch.addmm(weight.to(wide), lora_B.to(wide), lora_A.to(wide), alpha=scaling)
    weight.copy_(merged.mul_(scale.to(wide)[:, None]))
    return scale


@torch.no_grad()
def unmerge_weight(weight, lora_A, lora_B, scale: torch.Tensor, scaling: float) -> None:
    """Undo ``merge_weight``: ``W ← W / scale − s·B A`` in float32 (float64 for float64)."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    unscaled = weight.to(wide, copy=True).div_(scale.to(wide)[:, None])
    weight.copy_(unscaled.addmm_(lora_B.to(wide), lora_A.to(wide), alpha=-scaling))


def initial_magnitude(weight, lora_A, lora_B, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """PEFT's initial magnitude ``‖W_j + s·B_j A‖`` (``‖W_j‖`` while B is zero), in ``dtype``."""
    return weight_norm(weight, lora_A, lora_B, scaling).to(dtype)
