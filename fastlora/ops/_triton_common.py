"""Pieces shared by the Triton op modules (``triton_lora``, ``triton_qlora``).

``on_device``: every launch runs inside it (the device guard and, on the calling thread, Triton's
scratch allocator; see its docstring for the two hazards it closes).
``_empty``: every buffer their kernels fill is allocated through it, looked up on this module at
call time (``_triton_common._empty``) so that the tests' NaN poisoning patches one name for both.
``_flag_workspace`` / ``_flag_dummy``: the persistent kernels' flags, kept zeroed between calls.
``_dot``: ``tl.dot`` computed alike on a GPU and under ``TRITON_INTERPRET=1``: bf16 operands upcast
there (the interpreter's bf16 dot is wrong), and fp32 operands of "tf32" dots rounded to TF32 to
nearest on both (the interpreter ignores ``input_precision``; the tensor cores truncate).
``_reduce_over_m`` (kernel ``_lora_reduce_kernel``): ``scaling·lhsᵀ·D(rhs)`` over the long M axis,
the adapter gradients' reduction, optionally with ``Σ_m lhs`` (the bias gradient). M is split across
programs (about two an SM) writing fp32 partials (``_reduce_partials``) that ``torch.sum`` adds in a
fixed order (in the dense backward, ``_triton_finalize``'s kernel does): deterministic, no atomics.
Its products run on the tensor cores in the low-rank precision (TF32 for half inputs, whose 11
significant bits hold them exactly).

Not an op module: it defines no ``launch_for_inspection``; ``fastlora inspect`` sees its kernel
through the op modules' launches.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._tolerance import matmul_precision
from . import _prebound
from ._device import arch_rules, device_limits

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Host-side integer helpers. ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr-function
# wrappers in triton 3.8 (argument unwrapping on every call): 2-3 µs each, and a training step
# called them 20 times (about a fifth of its host path, census host table, 2026-12-02).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two ≥ ``n`` (0 for 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _tma_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's scratch allocator (device-side tensor descriptors): caching-allocator memory on the
    current device, which ``on_device`` has made the launch's, in the current stream's pool."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Make Triton's allocator ours in the calling thread's context, unless one is set there already.

    ``triton.set_allocator`` writes a ``contextvars.ContextVar``: a value set on the main thread is
    not seen by PyTorch's autograd thread (which runs the backward of CUDA tensors), nor by any
    other thread, where a TMA launch would raise "no allocator was set". So this runs before every
    launch, on the launching thread (a ContextVar read, well under a microsecond). An allocator the
    user (or torch.compile) set in this context is kept: any working allocator serves our kernels.
    """
    allocation = _allocation_module()
    current = getattr(allocation, "_allocator", None)
    get = getattr(current, "get", None)
    if get is None or isinstance(get(), allocation.NullAllocator):
        triton.set_allocator(_tma_allocator)


_allocation: list = []


def _allocation_module():
    """``triton.runtime._allocation``, imported once (an import statement per launch cost ~0.5 µs)."""
    if not _allocation:
        from triton.runtime import _allocation as module

        _allocation.append(module)
    return _allocation[0]


# The device guard of ``on_device``: what ``torch.cuda.device`` does on enter and exit, without
# building the context object and normalising the device per launch (about 1 µs of Python each time);
# torch.cuda.device itself where a torch lacks the two functions.
_exchange_device = getattr(torch.cuda, "_exchange_device", None)
_maybe_exchange_device = getattr(torch.cuda, "_maybe_exchange_device", None)


class CaptureAutotuneError(RuntimeError):
    """A Triton kernel would autotune inside a CUDA-graph capture, which cannot run its timing."""


# One lock for every Triton launch of this package. Triton's Autotuner keeps the call's arguments on
# the shared launcher object while it prunes and times (`self.nargs`), so two threads launching the
# same autotuned kernel at once, one of them tuning a new shape, made the tuning one raise
# ("'NoneType' object is not a mapping", reproduced under the interpreter on triton 3.8; 3.6 has the
# same code) or run the other's config. Launching is host work measured in µs; serialising it costs
# nothing next to the kernels. Re-entrant: an autotuner's timing calls the launch again.
_LAUNCH_LOCK = threading.RLock()
_launch_state = threading.local()  # .capturing: the launch in progress is inside a graph capture


def autotune_bench(kernel_call, quantiles):
    """The benchmark every autotuner of this package times configs with (``triton.autotune(...,
    do_bench=autotune_bench)``): Triton's own, refused inside a CUDA-graph capture, where its
    synchronisations would invalidate the capture. A shape is autotuned on its first eager call; a
    captured call of a shape not tuned yet raises ``CaptureAutotuneError`` naming the fix."""
    if getattr(_launch_state, "capturing", False):
        raise CaptureAutotuneError(
            "fastlora: a Triton kernel would autotune inside CUDA-graph capture (this problem shape was not "
            "run eagerly yet in this process, and autotuning synchronises the device). Run the step once "
            "eagerly with the same shapes before capturing (the usual warm-up), or use backend='torch'."
        )
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


class _Launch:
    """``on_device``'s context: the launch lock, then (CUDA) the allocator and the device guard."""

    __slots__ = ("_device", "_guard", "_previous", "_outer_capturing", "_outer_held")

    def __init__(self, device: torch.device):
        self._device, self._guard, self._previous, self._outer_capturing = device, None, None, False
        self._outer_held = None

    def __enter__(self):
        _LAUNCH_LOCK.acquire()
        try:
            self._outer_capturing = getattr(_launch_state, "capturing", False)
            self._outer_held = getattr(_launch_state, "held", None)
            if self._device.type == "cuda":
                _ensure_allocator()
                if _exchange_device is not None and _maybe_exchange_device is not None:
                    index = self._device.index
                    self._previous = _exchange_device(torch.cuda.current_device() if index is None else index)
                else:
                    guard = torch.cuda.device(self._device)
                    guard.__enter__()
                    self._guard = guard
                # (CUDA tensors exist, so CUDA is initialised; the check keeps a stray call cheap and safe)
                _launch_state.capturing = torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
            _launch_state.held = self._device
        except BaseException:
            try:
                self._restore_device()
            finally:
                _LAUNCH_LOCK.release()
            raise
        return None

    def _restore_device(self):
        if self._previous is not None:
            previous, self._previous = self._previous, None
            _maybe_exchange_device(previous)
        elif self._guard is not None:
            guard, self._guard = self._guard, None
            guard.__exit__(None, None, None)

    def __exit__(self, *exc):
        try:
            self._restore_device()
        finally:
            _launch_state.capturing = self._outer_capturing
            _launch_state.held = self._outer_held
            _LAUNCH_LOCK.release()
        return False


class _Held:
    """``on_device``'s context inside one of the same device on the same thread: the lock, the device
    guard, the allocator and the capture flag are the outer one's already, so nothing to do."""

    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_HELD = _Held()


def on_device(device: torch.device) -> _Launch:
    """Context for every Triton launch on tensors of ``device``: one process-wide launch lock (see
    ``_LAUNCH_LOCK``), then for CUDA tensors the scratch allocator set on this thread and the CUDA
    device guard; the autotuners' timing is refused while the launch is captured (``autotune_bench``).

    Triton launches on the *current* device, not on the tensors' one: with tensors on ``cuda:1`` and
    current device 0 (``device_map="auto"``, multi-GPU QLoRA) a launch without the guard reads across
    devices or faults, and the allocator's scratch lands on the wrong GPU. ``torch.cuda.device`` is a
    no-op exchange when the device is already current. Launches use the current stream (Triton's
    default), which the guard makes the current stream *of that device*.

    Nested in one for the same device on the same thread (an op that enters it once around all of
    its launches, and each launch site entering it again) it does nothing: about 1 µs a launch on
    the CPU, more on a GPU (two device exchanges and a capture query)."""
    if getattr(_launch_state, "held", None) == device:
        return _HELD
    return _Launch(device)


# Flag workspaces of the persistent kernels, per launching thread, keyed by (device, stream): kept
# zeroed between calls by the kernels themselves (their last user of a flag resets it), so that a
# call needs no memset. Per stream, because two launches in flight on two streams must not share
# flags; per thread, so that no two host threads can hand one buffer to launches on streams that
# the driver does not order (per-thread default streams), and a dead thread's buffers are freed.
_workspaces = threading.local()


# The current stream's handle without building a torch.cuda.Stream (what Triton's driver reads too).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_key(device: torch.device):
    if device.type != "cuda":
        return (device.type, None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _raw_stream(index) if _raw_stream is not None else torch.cuda.current_stream(index).cuda_stream
    return (index, stream)


def _flag_workspace(device: torch.device, size: int) -> torch.Tensor:
    """At least ``size`` zeroed int32 that the launch must leave zeroed, on ``device``'s current
    stream. Under CUDA-graph capture a fresh one for this call (its memset is part of the graph):
    memory from the graph's pool must not be reused by launches outside the graph."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(size, dtype=torch.int32, device=device)
        key = _stream_key(device)
    else:  # (_stream_key's answer, without its call: this runs on every launch with flags)
        key = (device.type, None)
    cache = getattr(_workspaces, "flags", None)
    if cache is None:
        cache = _workspaces.flags = {}
    buf = cache.get(key)
    if buf is None or buf.numel() < size:
        # Grown by powers of two: a memset only when a call needs more rows than any before it.
        buf = cache[key] = torch.zeros(max(64, next_pow2(size)), dtype=torch.int32, device=device)
    return buf


def _flag_dummy(device: torch.device) -> torch.Tensor:
    """The flags argument of a launch without flags: an int32 buffer of its own, never dereferenced
    (not another argument, so that a ``reset_to_zero`` of the flags could never clear an input)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.empty(1, dtype=torch.int32, device=device)
    cache = getattr(_workspaces, "dummies", None)
    if cache is None:
        cache = _workspaces.dummies = {}
    key = _stream_key(device)
    buf = cache.get(key)
    if buf is None:
        buf = cache[key] = torch.empty(1, dtype=torch.int32, device=device)
    return buf


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels fill comes from here (the tests patch it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


# TF32, as the CPU suite sees it and as a GPU computes it. The interpreter multiplies fp32 exactly
# whatever ``input_precision`` says; the tensor cores read a "tf32" operand's top 19 bits, i.e.
# Triton feeds them fp32 truncated (its tl.dot documentation warns of the bias): 7.7e-4 relative
# error in a product of random fp32 matrices, over the 5e-4 the tolerance table allows, against
# 2.9e-4 rounded to nearest (as cuBLAS does for torch). So ``_dot`` rounds the fp32 operands of a
# "tf32" dot to nearest itself, on the GPU and under the interpreter alike: the tensor cores' read
# of a rounded value is exact, so the interpreter's exact product of the rounded operands is the
# GPU's product (up to the order of the sums). ``_MODEL_TF32`` says the rounding is in.
_MODEL_TF32 = tl.constexpr(True)


@triton.jit
def _round_tf32(x):
    """fp32 ``x`` rounded to TF32: 10 explicit mantissa bits, to nearest (ties away from zero, as
    ``cvt.rna.tf32.f32``); infinities and NaNs unchanged."""
    bits = x.to(tl.int32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    # Adding half an ulp of TF32 to the magnitude bits carries into the exponent where it should;
    # -8192 is ~0x1FFF: the 13 mantissa bits TF32 drops. (Sign-magnitude: the sign bit is untouched.)
    rounded = ((tl.where(finite, bits, 0) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(finite, rounded, x)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b, acc, input_precision=PRECISION)``, the same on a GPU and under the interpreter:
    bf16 operands upcast there (``UPCAST``: its bf16 dot is wrong), and fp32 operands of a "tf32" dot
    rounded to TF32 to nearest everywhere (see ``_MODEL_TF32``). Every dot of the kernels that may
    run in TF32 goes through here. ``acc`` may be None."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if _MODEL_TF32:
        if PRECISION == "tf32":
            if a.dtype == tl.float32:
                a = _round_tf32(a)
            if b.dtype == tl.float32:
                b = _round_tf32(b)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _dot_tf32_exact_a(a, b, acc, PRECISION: tl.constexpr):
    """``_dot(a.to(fp32), b, acc, PRECISION)`` for an ``a`` that TF32 holds exactly (a half tile
    upcast): only ``b`` is rounded, sparing the integer ops on the larger ``a`` tile."""
    if _MODEL_TF32:
        if PRECISION == "tf32":
            b = _round_tf32(b)
    return tl.dot(a.to(tl.float32), b, acc, input_precision=PRECISION)


def _configs(shapes) -> list[triton.Config]:
    """Autotuner configs from ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` tuples."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# The interpreter cannot benchmark, and its cost grows with programs × K steps: one big tile.
INTERPRETER_CONFIGS = _configs([(64, 64, 64, 4, 1)])


def _padded_rank(size: int) -> int:
    return max(16, next_pow2(size))  # tl.dot needs every dimension >= 16


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    """``tl.dot`` input precision of the main loop and of the fp32 low-rank products."""
    fp32 = "tf32" if matmul_precision() != "highest" else "ieee"
    return fp32, ("tf32" if dtype in (torch.float16, torch.bfloat16) else fp32)


class _Dropout(NamedTuple):
    """LoRA dropout of one call: probability (a float), seed (an int), and ``1/(1 − p)`` (0 when
    everything drops), computed once in ``_dropout`` (the launch sites read it as a plain field)."""

    p: float
    seed: int
    scale: float


_NO_DROPOUT = _Dropout(0.0, 0, 1.0)


def _dropout(dropout_p: float, seed) -> _Dropout:
    if not dropout_p:
        return _NO_DROPOUT
    p = float(dropout_p)
    return _Dropout(p, int(seed), 1 / (1 - p) if p < 1 else 0.0)


@triton.jit
def _reduce_tile(
    lhs_ptr, rhs_ptr, ws_ptr, col_sum_ptr, tile,
    M, P, Q, rows_per_split,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_ws_split, stride_ws_p, stride_ws_q, stride_cs_split,
    scaling, dropout_p, seed,
    COL_SUM: tl.constexpr, RHS_DROPOUT: tl.constexpr, SPLIT_RHS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """Output tile ``tile`` (split-major, then P, then Q) of one reduction: ``ws[split] = scaling ·
    lhs[rows]ᵀ · D(rhs[rows])`` over the split's rows on the tensor cores (D: the dropout mask,
    unscaled: its 1/(1 − p) is folded into scaling) and, from the first Q tile, ``col_sum[split] =
    Σ lhs[rows]``. ``SPLIT_RHS``: fp32 rhs as two TF32 products (``_triton_grouped_reduce``'s doc).
    The body of ``_lora_reduce_kernel`` and of each of ``_grouped_reduce_kernel``'s problems."""
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_q = tile % num_q
    pid_p = (tile // num_q) % num_p
    split = tile // (num_q * num_p)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < row_end
        lhs = tl.load(
            lhs_ptr + offs_m[:, None] * stride_lm + offs_p[None, :] * stride_lp,
            mask=mask_m[:, None] & mask_p[None, :],
            other=0.0,
        )
        rhs = tl.load(
            rhs_ptr + offs_m[:, None] * stride_rm + offs_q[None, :] * stride_rq,
            mask=mask_m[:, None] & mask_q[None, :],
            other=0.0,
        ).to(tl.float32)
        if RHS_DROPOUT:
            rhs = tl.where(tl.rand(seed, offs_m[:, None] * Q + offs_q[None, :]) >= dropout_p, rhs, 0.0)
        if SPLIT_RHS:
            # lhs: a half tile, exact in TF32 (only rhs is rounded); rhs = hi + lo, both TF32.
            hi = _round_tf32(rhs)
            lhs_t = tl.trans(lhs)
            acc = _dot_tf32_exact_a(lhs_t, hi, acc, PRECISION)
            acc = _dot_tf32_exact_a(lhs_t, rhs - hi, acc, PRECISION)
        else:
            acc = _dot(tl.trans(lhs.to(tl.float32)), rhs, acc, PRECISION, False)
        if COL_SUM:
            col_sum += tl.sum(lhs.to(tl.float32), axis=0)

    ws_ptrs = ws_ptr + split.to(tl.int64) * stride_ws_split + offs_p[:, None] * stride_ws_p
    ws_ptrs += offs_q[None, :] * stride_ws_q
    tl.store(ws_ptrs, acc * scaling, mask=mask_p[:, None] & mask_q[None, :])
    if COL_SUM:
        if pid_q == 0:
            tl.store(col_sum_ptr + split.to(tl.int64) * stride_cs_split + offs_p, col_sum, mask=mask_p)


# seed: a new value every call; specialising on it would compile for seed == 1 and % 16.
@triton.jit(do_not_specialize=["seed"])
def _lora_reduce_kernel(
    lhs_ptr, rhs_ptr, ws_ptr, col_sum_ptr,
    M, P, Q, rows_per_split,
    stride_lm, stride_lp, stride_rm, stride_rq,
    stride_ws_split, stride_ws_p, stride_ws_q, stride_cs_split,
    scaling, dropout_p, seed,
    COL_SUM: tl.constexpr, RHS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    # Grid (P tiles, Q tiles, splits): one _reduce_tile each, its tile index rebuilt split-major. The
    # grid must be exactly (cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q), splits), as _reduce_layout makes it: a
    # padded one would alias tiles into the next split.
    tile = (tl.program_id(2) * tl.cdiv(P, BLOCK_P) + tl.program_id(0)) * tl.cdiv(Q, BLOCK_Q) + tl.program_id(1)
    _reduce_tile(
        lhs_ptr, rhs_ptr, ws_ptr, col_sum_ptr, tile, M, P, Q, rows_per_split,
        stride_lm, stride_lp, stride_rm, stride_rq, stride_ws_split, stride_ws_p, stride_ws_q, stride_cs_split,
        scaling, dropout_p, seed, COL_SUM, RHS_DROPOUT, False, PRECISION, BLOCK_M, BLOCK_P, BLOCK_Q,
    )  # fmt: skip


def _split_count(device: torch.device, tiles: int, row_blocks: int) -> int:
    """Splits of M that give about two programs per SM."""
    return _split_count_for(device_limits(device), tiles, row_blocks)


def _split_count_for(limits, tiles: int, row_blocks: int) -> int:
    """``_split_count`` on a device of ``limits``."""
    return max(1, min(row_blocks, 2 * limits.sm_count // tiles))


def _reduce_blocks(P: int, Q: int, max_accumulators: int = 8192) -> tuple[int, int]:
    """Output tile of the reduction: each side up to 128, at most ``max_accumulators`` fp32 a program."""
    block_p = min(128, _padded_rank(P))
    block_q = min(128, _padded_rank(Q))
    while block_p * block_q > max_accumulators:
        if block_p >= block_q:
            block_p //= 2
        else:
            block_q //= 2
    return block_p, block_q


# Random numbers a thread draws a row step for the rhs dropout mask: at 64 per thread (16×128 and
# 32×128 tiles, 4 warps, 64-row steps) r = 32 spilled 312-488 bytes on sm_90a, sm_100a and sm_120
# (sm_80 none, at 254 registers), and r = 16 sat at 255 registers everywhere; 32-row steps (32 a
# thread) compiled clean on all four (128-167 registers). 8-warp tiles draw 16-32 a thread.
_MAX_REDUCE_DRAWS = 32


def _reduce_config(P: int, Q: int, precision: str, dropout: bool, device: torch.device) -> tuple[int, int, int, int]:
    """``_reduce_config_for`` on ``device``'s limits."""
    return _reduce_config_for(P, Q, precision, dropout, device_limits(device))


@functools.lru_cache(maxsize=1024)  # a backward asks once per launch: ~2 µs computed, ~0.3 µs cached
def _reduce_config_for(P: int, Q: int, precision: str, dropout: bool, limits) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_P, BLOCK_Q, num_warps)`` of ``_lora_reduce_kernel`` for ``lhs [M, P]``, ``rhs [M, Q]``.

    Compiled for sm_90a and sm_80 (fastlora inspect), 4 warps and 64-row steps spilled in two ways.
    fp32 products on the CUDA cores ("ieee", torch's default fp32 matmul precision) keep a row slice
    of both operands per thread beside the accumulators: a 128×64 tile spilled 1.7 KiB, 128×16 with
    the column sums 448-496 bytes, 64×64 in 32-row steps 72-400; 32-row steps on tiles of at most
    2048 accumulators did not (56-207 registers). On the tensor cores, 64×128 tiles spilled 8-216
    bytes with 4 warps and none with 8. The 4-warp tensor-core tiles step by the arch's
    ``reduce_rows`` (sm_100a: 32, see ``_device``), and by fewer rows where the dropout mask would
    draw more than ``_MAX_REDUCE_DRAWS`` a thread.
    """
    fma = precision == "ieee"
    block_p, block_q = _reduce_blocks(P, Q, 2048 if fma else 8192)
    num_warps = 8 if not fma and block_p * block_q > 4096 else 4
    if fma:
        block_m = 32
    elif num_warps == 8:
        block_m = 64
    else:
        block_m = arch_rules(limits.capability).reduce_rows
    while dropout and block_m > 16 and block_m * block_q > _MAX_REDUCE_DRAWS * 32 * num_warps:
        block_m //= 2
    return block_m, block_p, block_q, num_warps


@functools.lru_cache(maxsize=4096)  # one entry a problem and batch size; ~0.4 µs a hit against ~3 µs
def _reduce_layout(M: int, P: int, Q: int, precision: str, dropout: bool, col_sum: bool, limits):
    """``(config, rows_per_split, grid)`` of one ``_lora_reduce_kernel`` launch: ``config`` =
    ``(col_sum, dropout, precision, BLOCK_M, BLOCK_P, BLOCK_Q, num_warps)`` (``_reduce_config_for``),
    M split into ``grid[2]`` splits of ``rows_per_split`` rows, about two programs an SM."""
    block_m, block_p, block_q, num_warps = _reduce_config_for(P, Q, precision, dropout, limits)
    tiles = cdiv(P, block_p) * cdiv(Q, block_q)
    row_blocks = cdiv(M, block_m)
    rows_per_split = cdiv(row_blocks, _split_count_for(limits, tiles, row_blocks)) * block_m
    grid = (cdiv(P, block_p), cdiv(Q, block_q), cdiv(M, rows_per_split))
    return (col_sum, dropout, precision, block_m, block_p, block_q, num_warps), rows_per_split, grid


def _reduce_over_m(
    lhs, rhs, scaling: float, out_dtype: torch.dtype, rhs_dropout: _Dropout = _NO_DROPOUT, col_sum: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scaling·lhsᵀ·D(rhs) [P, Q] in out_dtype, Σ_m lhs [P] fp32 if col_sum else None)`` for
    ``lhs [M, P]``, ``rhs [M, Q]``; ``D`` is LoRA dropout, the identity by default. The partials of
    ``_reduce_partials`` summed by ``torch.sum`` (the dense backward sums them in its finalize launch)."""
    M, P = lhs.shape
    Q = rhs.shape[1]
    if M == 0:
        sums = torch.zeros(P, dtype=torch.float32, device=lhs.device) if col_sum else None
        return torch.zeros((P, Q), dtype=out_dtype, device=lhs.device), sums
    ws, sums = _reduce_partials(lhs, rhs, scaling, rhs_dropout, col_sum)
    return ws.sum(0).to(out_dtype), (sums.sum(0) if col_sum else None)


def _reduce_partials(
    lhs, rhs, scaling: float, rhs_dropout: _Dropout = _NO_DROPOUT, col_sum: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch of ``_lora_reduce_kernel`` for ``lhs [M, P]``, ``rhs [M, Q]``, M > 0: the fp32
    partials ``ws [S, P, Q]`` (``Σ_s ws[s] = scaling·lhsᵀ·D(rhs)``, each ``ws[s]`` contiguous) and, if
    ``col_sum``, ``sums [S, P]`` (``Σ_s sums[s] = Σ_m lhs``; else None), S splits of M."""
    M, P = lhs.shape
    Q = rhs.shape[1]
    device = lhs.device
    dropout = bool(rhs_dropout.p)
    config, rows_per_split, grid = _reduce_layout(
        M, P, Q, _precisions(rhs.dtype)[1], dropout, col_sum, device_limits(device)
    )  # fmt: skip
    splits = grid[2]
    ws = _empty((splits, P, Q), torch.float32, device)
    sums = _empty((splits, P), torch.float32, device) if col_sum else ws  # ws: a pointer never written
    ints = (P, Q, *lhs.stride(), *rhs.stride(), *ws.stride(), sums.stride(0))
    args = (
        lhs, rhs, ws, sums, M, P, Q, rows_per_split, *ints[2:],
        float(scaling * rhs_dropout.scale), rhs_dropout.p, rhs_dropout.seed,
    )  # fmt: skip

    def setup():
        _, _, precision, block_m, block_p, block_q, num_warps = config
        return dict(
            COL_SUM=col_sum, RHS_DROPOUT=dropout, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q, num_warps=num_warps,
        )  # fmt: skip

    with on_device(device):
        # The site's signature (_prebound.launch_keyed): the ints by value but M and rows_per_split
        # (free: the grid carries the split count), the seed by width; the config settles the constexprs.
        _prebound.launch_keyed(
            _lora_reduce_kernel, grid, args, (config, ints), args[:4], setup, device, free=("M", "rows_per_split")
        )  # fmt: skip
    return ws, (sums if col_sum else None)
