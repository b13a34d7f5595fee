"""What the Triton launchers need to know about the GPU they launch on, in one place.

Launchers size persistent grids, split counts and shared-memory budgets from ``device_limits``
rather than asking ``torch.cuda`` themselves, so that ``fastlora inspect`` can stand in the limits
of a GPU it compiles for (``target_limits``) on a machine that has none.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
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
# CPU tensors (the Triton interpreter): a few programs, so that the tests exercise splitting and
# persistent tile loops, with Hopper's shared memory so that every config is considered.
_CPU_LIMITS = DeviceLimits(sm_count=4, max_shared_bytes=227 * 1024, capability=(9, 0))

_override: contextvars.ContextVar[DeviceLimits | None] = contextvars.ContextVar("fastlora_device_limits", default=None)


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
    override = _override.get()
    if override is not None:
        return override
    if device.type != "cuda":
        return _CPU_LIMITS
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def target_limits(limits: DeviceLimits):
    """Within the block, ``device_limits`` answers ``limits`` for every device."""
    token = _override.set(limits)
    try:
        yield limits
    finally:
        _override.reset(token)
