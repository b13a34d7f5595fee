"""Clocks and memory: median times of steps, measured interleaved, and the peak memory of a step.

Each step may have an untimed ``setup`` run before every call (the backward's forward). The steps of
one case are timed in interleaved rounds (a few calls of each in turn, repeated), so that a change
in the machine's load during a case (other processes, clocks) hits every provider alike; each
step's median and quartiles over all its calls are kept.

GPU: a pair of CUDA events around each call; they measure what the GPU spends between them,
including idle gaps while the host launches kernels slower than the GPU runs them (small M), so
launch overhead counts. CPU: ``time.perf_counter`` around each call.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, NamedTuple

import torch

WARMUP_S = 0.05  # per step, at least MIN_WARMUP calls
MIN_WARMUP = 2
MEASURE_S = 0.5  # per step, in ROUNDS rounds, MIN_REPEATS to MAX_REPEATS calls
ROUNDS = 5
MIN_REPEATS, MAX_REPEATS = 10, 500


class Timed(NamedTuple):
    step: Callable[[], None]
    setup: Callable[[], None] | None = None


def synchronized(step: Callable[[], None], device: str) -> Callable[[], None]:
    """``step`` followed by a device synchronisation, so that a wall clock around it measures the
    work itself (pytest-benchmark's clock)."""
    if device == "cpu":
        return step

    def step_and_sync() -> None:
        step()
        torch.cuda.synchronize(device)

    return step_and_sync


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def warm_up(timed: Timed, device: str) -> float:
    """Run the step for ``WARMUP_S`` (at least ``MIN_WARMUP`` calls); returns seconds per call."""
    calls, spent = 0, 0.0
    while calls < MIN_WARMUP or spent < WARMUP_S:
        if timed.setup:
            timed.setup()
        _sync(device)
        start = time.perf_counter()
        timed.step()
        _sync(device)
        spent += time.perf_counter() - start
        calls += 1
    return spent / calls


def repeats(seconds_per_call: float) -> int:
    """How many calls last about ``MEASURE_S``, within ``MIN_REPEATS`` and ``MAX_REPEATS``."""
    return min(MAX_REPEATS, max(MIN_REPEATS, round(MEASURE_S / seconds_per_call)))


def _time_calls(timed: Timed, device: str, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` calls."""
    if device == "cpu":
        times = []
        for _ in range(calls):
            if timed.setup:
                timed.setup()
            start = time.perf_counter()
            timed.step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        if timed.setup:
            timed.setup()
        start.record()
        timed.step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


class Timing(NamedTuple):
    """Median and quartiles of the milliseconds per call: the quartiles bound the noise."""

    median_ms: float
    q1_ms: float
    q3_ms: float


def time_steps(steps: list[Timed], device: str) -> list[Timing]:
    """The ``Timing`` of each step, after warm-up, timed in interleaved rounds; each step gets
    enough calls to last about ``MEASURE_S``."""
    per_round = [math.ceil(repeats(warm_up(timed, device)) / ROUNDS) for timed in steps]
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(ROUNDS):
        for timed, calls, acc in zip(steps, per_round, times):
            acc.extend(_time_calls(timed, device, calls))
    return [Timing(median, q1, q3) for q1, median, q3 in (statistics.quantiles(t, n=4) for t in times)]


def peak_extra_mib(timed: Timed, device: str) -> float | None:
    """GPU: peak memory allocated during one call above what was allocated before it (after its
    setup), in MiB: saved activations, temporaries and the gradients left. CPU: None."""
    if device == "cpu":
        return None
    if timed.setup:
        timed.setup()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    timed.step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
