"""``finalize_sums``: the last launch of the Triton backward, which turns the fp32 partial buffers
its kernels wrote into the gradients, in one launch for up to three outputs:

    out_j = cast_j( scale_j · (running_j + Σ_s parts_j[s]) )      for j < 3

for ``parts_j [S_j, *shape_j]`` (fp32, the trailing dimensions contiguous), ``out_j [*shape_j]``
(contiguous, any float dtype: written directly, so no cast or scaling runs after it) and an optional
fp32 ``running_j [*shape_j]`` (the sums of earlier row slices; it may be ``out_j`` itself, each element
being read and written by the same program). Programs ``[0, b_0)`` serve output 0, the next ``b_1``
output 1, and so on, ``b_j = ⌈numel_j / BLOCK⌉``.

Deterministic: each element is summed by one program, over ``s`` in chunks of ``CHUNK`` rows taken in
order (each chunk a fixed-shape ``tl.sum``, the same tree every run), then added to ``running``, so the
same inputs give the same bits run to run and program count to program count; no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _prebound
from ._triton_common import on_device

# 512 fp32 a program (4 contiguous a thread at 4 warps: 16-byte loads), 8 partial rows a step: about
# 260 programs for grad_A, grad_B and the bias of a 4096×4096 layer at r = 16, two an SM.
_BLOCK = 512
_CHUNK = 8
_MAX_JOBS = 3


@triton.jit
def _sum_rows(
    parts_ptr, running_ptr, out_ptr, block, numel, splits, stride_split, scale,
    RUNNING: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Elements ``[block·BLOCK, (block + 1)·BLOCK)`` of one output (see the module doc)."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, splits, CHUNK):
        rows = s0 + tl.arange(0, CHUNK)
        ptrs = parts_ptr + rows.to(tl.int64)[:, None] * stride_split + offs[None, :]
        acc += tl.sum(tl.load(ptrs, mask=(rows < splits)[:, None] & mask[None, :], other=0.0), axis=0)
    if RUNNING:
        acc = tl.load(running_ptr + offs, mask=mask, other=0.0) + acc
    tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finalize_kernel(
    parts0, running0, out0, numel0, splits0, stride0, scale0,
    parts1, running1, out1, numel1, splits1, stride1, scale1,
    parts2, running2, out2, numel2, splits2, stride2, scale2,
    RUNNING0: tl.constexpr, RUNNING1: tl.constexpr, RUNNING2: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    blocks0 = tl.cdiv(numel0, BLOCK)
    blocks1 = tl.cdiv(numel1, BLOCK)
    if pid < blocks0:
        _sum_rows(parts0, running0, out0, pid, numel0, splits0, stride0, scale0, RUNNING0, BLOCK, CHUNK)
    elif pid < blocks0 + blocks1:
        _sum_rows(parts1, running1, out1, pid - blocks0, numel1, splits1, stride1, scale1, RUNNING1, BLOCK, CHUNK)
    else:
        _sum_rows(
            parts2, running2, out2, pid - blocks0 - blocks1, numel2, splits2, stride2, scale2, RUNNING2, BLOCK, CHUNK
        )


def finalize_sums(jobs) -> None:
    """Write each job's ``out`` (module doc) in one launch, on the outputs' device. ``jobs``: up to three
    tuples ``(parts, out, scale, running or None)``, built by the backward (shapes as in the module doc,
    checked here only by their sizes: a host path kept short, called once a backward)."""
    if not jobs:
        return
    if len(jobs) > _MAX_JOBS:
        raise ValueError(f"finalize_sums takes at most {_MAX_JOBS} outputs, got {len(jobs)}")
    first = jobs[0][1]
    args, tensors, key, programs = [], [], [], 0
    for parts, out, scale, running in jobs:
        numel = out.numel()
        splits = parts.shape[0]
        if parts.dtype != torch.float32 or parts.numel() != splits * numel:
            raise ValueError(f"finalize_sums: partials {tuple(parts.shape)} {parts.dtype} for {tuple(out.shape)}")
        held = out if running is None else running
        stride = parts.stride(0)
        args += (parts, held, out, numel, splits, stride, float(scale))
        tensors += (parts, held, out)
        key += (running is not None, numel, stride)  # the RUNNING flags and the ints but splits (free)
        programs += -(-numel // _BLOCK)
    for _ in range(_MAX_JOBS - len(jobs)):  # an absent output: no program reads these pointers
        args += (first, first, first, 0, 0, 0, 1.0)
        key += (False, 0, 0)
    key = tuple(key)

    def setup():
        return dict(RUNNING0=key[0], RUNNING1=key[3], RUNNING2=key[6], BLOCK=_BLOCK, CHUNK=_CHUNK, num_warps=4)

    with on_device(first.device):
        # The partials' row-block counts change with the batch: keyed by their specialisation only.
        _prebound.launch_keyed(
            _finalize_kernel, (programs,), tuple(args), key, tuple(tensors), setup, first.device, free=_FREE
        )  # fmt: skip


_FREE = ("splits0", "splits1", "splits2")
