"""What the Triton launchers need to know about the GPU they launch on, in one place.

Launchers size persistent grids, split counts and shared-memory budgets from ``device_limits``
rather than asking ``torch.cuda`` themselves, so that ``fastlora inspect`` can stand in the limits
of a GPU it compiles for (``target_limits``) on a machine that has none. What an architecture has
(wgmma, tcgen05, TMA) and the tile rules that follow are stated once, per arch, in ``arch_rules``:
"capability ≥ 9.0" is not "Hopper" (sm_100 has tcgen05 instead of wgmma, sm_120 has neither).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import NamedTuple

import torch


class DeviceLimits(NamedTuple):
    """``sm_count`` streaming multiprocessors; ``max_shared_bytes`` of shared memory one program may
    opt in to; ``capability`` as ``(major, minor)``."""

    sm_count: int
    max_shared_bytes: int
    capability: tuple[int, int]


# Published limits of the GPUs the kernels are compiled and inspected for.
KNOWN_LIMITS = {
    (9, 0): DeviceLimits(sm_count=132, max_shared_bytes=227 * 1024, capability=(9, 0)),  # H100 SXM
    (8, 0): DeviceLimits(sm_count=108, max_shared_bytes=163 * 1024, capability=(8, 0)),  # A100
    (10, 0): DeviceLimits(sm_count=148, max_shared_bytes=227 * 1024, capability=(10, 0)),  # B200
    (12, 0): DeviceLimits(sm_count=170, max_shared_bytes=99 * 1024, capability=(12, 0)),  # RTX 5090
}


class ArchRules(NamedTuple):
    """What the kernels and their config pruners may assume of one architecture.

    ``mma``: the instruction Triton lowers ``tl.dot`` to: ``"mma.sync"`` (sm_80-89 and consumer
    Blackwell sm_120, whose operands sit in registers), ``"wgmma"`` (sm_90a only: warp-group MMA
    from shared memory) or ``"tcgen05"`` (sm_100, datacenter Blackwell: accumulators in tensor
    memory). ``tma``: tensor descriptors (TMA loads and stores): sm_90, sm_100 and sm_120.
    ``min_rows``: the shortest row block of a non-decode tile that fills the MMA (64 rows a warp
    group for wgmma, tcgen05's M is 64 or 128; mma.sync is fine with 32). ``max_k_step``: the longest
    K step worth timing (mma.sync holds a K step's operands in registers: on sm_80 every K step of
    64 spilled; None: no limit). ``small_tiles_when_busy``: at r ≥ 64 or with a busy main loop only
    tiles of at most 64×64 (sm_80: 64×128 and 128×128 spilled 40-120 bytes).

    ``grad_b_rows``: the (wide, narrow) row block of the grad_x pass with fused grad_B partials, and
    ``grad_b_wide_ranks`` the largest padded rank that takes the wide one (without, with LoRA dropout,
    whose epilogue draws a random number per output element beside the partials' operands); see
    ``grad_b_block``. ``reduce_rows``: the row step (its dot's K) of the split-M reduce's 4-warp
    tensor-core programs (``_triton_common._reduce_config``)."""

    mma: str
    tma: bool
    min_rows: int
    max_k_step: int | None
    small_tiles_when_busy: bool
    grad_b_rows: tuple[int, int]
    grad_b_wide_ranks: tuple[int, int]
    reduce_rows: int

    @property
    def has_wgmma(self) -> bool:
        return self.mma == "wgmma"

    def grad_b_block(self, rank_pad: int, dropout: bool) -> int:
        """The row block of grad_x with fused grad_B partials at padded rank ``rank_pad``."""
        wide, narrow = self.grad_b_rows
        return wide if rank_pad <= self.grad_b_wide_ranks[dropout] else narrow


# Each arch's grad_x row blocks and reduce step, compiled by `fastlora inspect` (triton 3.8, M = 8192,
# 4096², bf16 x, bf16 or fp32 adapters; grad_x configs of GRAD_X_CONFIGS, stack bytes a thread):
# - mma.sync (sm_80): every 128-row grad_x spilled (112-168), 64 rows at r ≤ 32 did not, with dropout
#   too (r = 32: 64×64×32/4 warps/2 stages 255 registers, none); at r ≥ 64 64×64×32 spilled 8-40.
#   sm_120 alike: 64 rows, r = 32 with dropout, 190-242 registers, none.
# - wgmma (sm_90a): 128 rows clean at r ≤ 32 without dropout (r = 32: 128×64×32/8 warps 244-254
#   registers) and at r = 16 with it (234-248), not at r = 32 with dropout (every 128-row config
#   spilled 8-120; 64 rows 250-255 registers, none but with fp32 adapters 64×64×32/4 warps/2 stages
#   only, the others 8-72 and dropped by the compiler check); at r = 64 every 128-row config spilled
#   (16-232).
# - tcgen05 (sm_100a): 128 rows clean without dropout at r ≤ 32 (r = 16: 190-249 registers; r = 32:
#   128×64×64 217-236, while 128×64×32 spilled 24 and the compiler check drops it), but with
#   dropout every 128-row config spilled at r = 16 (8 bytes bf16 and 64-112 fp32 adapters) and r = 32
#   (32-88); 64 rows compiled clean there (178-229 registers). The reduce's 16×128 tile (r = 16, 4 warps)
#   in 64-row steps: 128 registers and 24 bytes of stack on sm_100a (none on sm_80/90a/120: 96-136
#   registers); 32-row steps 78, none (r = 32: 151); 8 warps 119, but 16 bytes with dropout.
_MMA_SYNC = ArchRules("mma.sync", tma=False, min_rows=32, max_k_step=32, small_tiles_when_busy=True,
                      grad_b_rows=(64, 32), grad_b_wide_ranks=(32, 32), reduce_rows=64)  # fmt: skip
_RULES = {
    8: _MMA_SYNC,  # sm_80-89 (Ampere, Ada)
    9: ArchRules("wgmma", tma=True, min_rows=64, max_k_step=None, small_tiles_when_busy=False,
                 grad_b_rows=(128, 64), grad_b_wide_ranks=(32, 16), reduce_rows=64),  # fmt: skip
    # Accumulators in tensor memory leave the registers to the operands: the Hopper tile shapes, but
    # not the 128-row grad_x with dropout, nor the reduce's 64-row steps (see above).
    10: ArchRules("tcgen05", tma=True, min_rows=64, max_k_step=None, small_tiles_when_busy=False,
                  grad_b_rows=(128, 64), grad_b_wide_ranks=(32, 0), reduce_rows=32),  # fmt: skip
    # Consumer Blackwell (sm_120, sm_121): no wgmma or tcgen05, mma.sync as on sm_80 (and ~99 KiB of
    # shared memory a block, which KNOWN_LIMITS carries), but TMA.
    12: _MMA_SYNC._replace(tma=True),
}


def arch_rules(capability: tuple[int, int]) -> ArchRules:
    """The rules of compute capability ``capability``; an architecture not listed (older than
    sm_80, newer than this table, or sm_110, whose Triton support is not checked here) gets sm_80's,
    which assume the least: no TMA, mma.sync's short K steps, small tiles and row blocks."""
    return _RULES.get(capability[0], _MMA_SYNC)


# CPU tensors (the Triton interpreter): a few programs, so that the tests exercise splitting and
# persistent tile loops, with Hopper's shared memory so that every config is considered.
_CPU_LIMITS = DeviceLimits(sm_count=4, max_shared_bytes=227 * 1024, capability=(9, 0))

# What target_limits stands in, for the whole process: a plain global, not a ContextVar, so that
# a launch made on another thread inside the block (PyTorch's autograd thread runs the backward of
# CUDA tensors) sees the same target as the thread that entered it. Only `fastlora inspect` and
# `fastlora census` set it, on CPU tensors, from one thread at a time (the lock orders nested uses);
# it applies to CPU tensors only, so that a real launch on a GPU meanwhile sizes itself by its own GPU.
_override: list[DeviceLimits] = []
_override_lock = threading.RLock()


@functools.cache
def _cuda_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", None) or KNOWN_LIMITS.get(
        (props.major, props.minor), KNOWN_LIMITS[(8, 0)]
    ).max_shared_bytes
    return DeviceLimits(props.multi_processor_count, shared, (props.major, props.minor))


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of ``device`` (a CUDA device, or the CPU under the interpreter), or of the target
    that ``target_limits`` stands in."""
    # Called several times a launch: device.type and device.index are read once each.
    if device.type != "cuda":
        return _override[-1] if _override else _CPU_LIMITS  # a real GPU launch on another thread keeps its own limits
    index = device.index
    return _cuda_limits(index if index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def target_limits(limits: DeviceLimits):
    """Within the block, ``device_limits`` answers ``limits`` for every device, on every thread."""
    with _override_lock:
        _override.append(limits)
        try:
            yield limits
        finally:
            _override.pop()
