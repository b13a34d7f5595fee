"""The correctness gate of ``backend="auto"``: every candidate is checked against a reference
candidate on the same scratch inputs before its time counts.

A candidate is a ``Candidate(check, run)`` of zero-argument callables over scratch inputs its
builder made (the caller's tensors are never touched). Each returns the step's outputs as a dict
``{name: tensor or None}`` (``"y"``, and the gradients when the step runs a backward). ``check`` is
compared with the reference's ``check``; ``run`` is what is timed (``check`` itself when None;
a different ``run`` serves e.g. dropout, whose mask differs by backend, so the check runs with
dropout 0 and the timing with the call's dropout, its outputs checked to be finite only).

``evaluate`` runs the reference first, then each candidate: the check (also its first run, which
autotunes), the timing (``timer``, whose runs include the autotuner's reruns of a cached config),
then the last timed run's outputs again. A candidate fails, and is excluded, on:

- a result farther from the reference than **twice** the tolerance table's bound for the dtype of
  the computation, ``y``'s (``fastlora._tolerance``; twice because the table bounds each backend's
  distance to the exact result, and the two distances add), or a NaN/inf;
- an exception;
- a step or timing that exceeds ``DEADLINE_S`` of wall time (CUDA work is waited for by polling an
  event, not by a blocking synchronise, so a kernel that never finishes is reported, not waited on
  forever; that kernel still occupies its stream, which no process can undo).

A failure is ``Failure(reason, transient)``; ``transient`` (out of memory, timeout) means it may
pass another time, so a cache must not keep it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, NamedTuple

import torch

from .._tolerance import rel_error, tolerance

# timer(backend name, run, device) → median ms of run(); tests inject a fake one.
Timer = Callable[[str, Callable[[], None], torch.device], float]
Outputs = dict  # {output name: tensor or None}

WARMUP = 2  # runs before timing: the first autotunes (triton) and fills the allocator's cache
REPS = 5
DEADLINE_S = 60.0  # wall seconds a check or a timing may take (a cold triton compile included)
_POLL_S = 1e-4


class GateTimeout(TimeoutError):
    """A candidate's step did not finish within ``DEADLINE_S``."""


class Failure(NamedTuple):
    """Why a candidate was excluded; ``transient``: it may pass another time (not to be cached)."""

    reason: str
    transient: bool


class Candidate(NamedTuple):
    """``check()`` → outputs compared with the reference's; ``run()`` → the timed step (None: check)."""

    check: Callable[[], Outputs]
    run: Callable[[], Outputs] | None = None


def wait(device: torch.device, start: float) -> None:
    """Wait for the work queued on ``device``'s current stream, raising ``GateTimeout`` once
    ``DEADLINE_S`` has passed since ``start`` (``time.monotonic()``)."""
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        while not event.query():
            if time.monotonic() - start > DEADLINE_S:
                raise GateTimeout(f"did not finish within {DEADLINE_S:g} s")
            time.sleep(_POLL_S)
    if time.monotonic() - start > DEADLINE_S:
        raise GateTimeout(f"did not finish within {DEADLINE_S:g} s")


def cuda_event_timer(name: str, run: Callable[[], None], device: torch.device) -> float:
    """Median milliseconds of ``run`` (backend ``name``'s step) on ``device``'s current stream, timed
    with CUDA events after ``WARMUP`` untimed runs; ``GateTimeout`` past ``DEADLINE_S``."""
    start = time.monotonic()
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPS):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        wait(device, start)
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def _pack(t: torch.Tensor) -> torch.Tensor:
    return t.detach()  # not t itself: a saved output holding itself would be a reference cycle


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def isolated(device: torch.device):
    """The scope a measurement runs in, apart from the caller's state: on ``device`` (its streams
    and events), CPU and CUDA generators restored after, autocast off, and none of the caller's
    saved-tensor hooks or Python dispatch modes. Under ``checkpoint(use_reentrant=False)`` those
    hooks would pack the scratch graph's tensors into the checkpoint, and the scratch backward would
    then unpack them by recomputing the caller's function, re-entering ``auto`` (a deadlock before);
    a selective checkpoint's dispatch mode would cache the scratch ops as the caller's. Hooks of our
    own on top of the stack are the ones applied (only the innermost pair is), doing what no hook
    does."""
    on_cuda = device.type == "cuda"
    with contextlib.ExitStack() as stack:
        if on_cuda:
            stack.enter_context(torch.cuda.device(device))
        stack.enter_context(torch.random.fork_rng(devices=[device.index or 0] if on_cuda else []))
        stack.enter_context(torch.autocast(device.type, enabled=False))
        disable_modes = getattr(getattr(torch.utils, "_python_dispatch", None), "_disable_current_modes", None)
        if disable_modes is not None:
            stack.enter_context(disable_modes())
        if torch._C._autograd._saved_tensors_hooks_is_enabled():
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_pack, _unpack))
        yield


def _mismatch(outputs: Outputs, reference: Outputs | None, device: torch.device) -> str | None:
    """Why ``outputs`` fail (non-finite, or farther from ``reference`` than twice the tolerance);
    None if they pass. ``reference`` None: finiteness only."""
    for name, out in outputs.items():
        if out is not None and out.is_floating_point() and not bool(torch.isfinite(out).all()):
            return f"non-finite result: {name} holds NaN or inf"
    if reference is None:
        return None
    # The computation's precision is y's dtype (x's): an fp32 gradient of fp32 adapters computed from
    # bf16 activations is as precise as bf16, which is how the tests hold every gradient too.
    dtype = reference["y"].dtype if reference.get("y") is not None else None
    for name in [*reference, *(n for n in outputs if n not in reference)]:  # y first
        out, ref = outputs.get(name), reference.get(name)
        if (out is None) != (ref is None):
            return f"wrong result: {name} is {'missing' if out is None else 'produced'}, unlike the reference's"
        if out is None:
            continue
        if out.shape != ref.shape:
            return f"wrong result: {name} has shape {tuple(out.shape)}, the reference's {tuple(ref.shape)}"
        of = dtype or ref.dtype
        bound = 2 * tolerance(of, device)
        error = rel_error(out, ref)
        if not error <= bound:
            return f"wrong result: {name} differs from the reference's by {error:.2e} (> {bound:.1e}, twice {of}'s tolerance)"
    return None


def failure_of(err: BaseException) -> Failure:
    """The ``Failure`` an exception amounts to (transient: out of memory, a timeout)."""
    if isinstance(err, GateTimeout):
        return Failure(f"timed out: {err}", True)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return Failure(f"raised {type(err).__name__}: {first}", isinstance(err, (torch.OutOfMemoryError, TimeoutError)))


def _checked(name, candidate: Candidate, reference: Outputs | None, device, timer: Timer | None):
    """``(ms or None, Failure or None, check outputs)`` of one candidate."""
    start = time.monotonic()
    outputs = candidate.check()
    wait(device, start)
    problem = _mismatch(outputs, reference, device)
    if problem is not None:
        return None, Failure(problem, False), outputs
    if timer is None:  # check only: one more run, as an autotuned config reruns
        last = candidate.check()
        wait(device, start)
        problem = _mismatch(last, reference, device)
        return None, (Failure(f"{problem} (second run)", False) if problem else None), outputs
    step = candidate.run or candidate.check
    kept: list = []

    def run() -> None:
        kept[:] = [step()]

    start = time.monotonic()
    ms = float(timer(name, run, device))
    wait(device, start)
    if kept:
        problem = _mismatch(kept[0], reference if candidate.run is None else None, device)
        if problem is not None:
            return None, Failure(f"{problem} (last timed run)", False), outputs
    return ms, None, outputs


def evaluate(
    candidates: dict[str, Candidate], reference: str, device: torch.device, timer: Timer | None
) -> dict[str, float | Failure | None]:
    """Each candidate's median ms (None when ``timer`` is None: checked only), or its ``Failure``.
    ``candidates[reference]`` runs first and is what the others are compared with; if it fails,
    every other candidate fails as unchecked (with its transience). Run inside ``isolated``."""
    results: dict[str, float | Failure | None] = {}
    try:
        ms, failure, ref = _checked(reference, candidates[reference], None, device, timer)
        ref = {k: (v.detach().clone() if v is not None else None) for k, v in ref.items()}
    except Exception as err:  # a failing candidate must not fail the user's call
        ms, failure = None, failure_of(err)
    results[reference] = failure or ms
    for name, candidate in candidates.items():
        if name == reference:
            continue
        if failure is not None:
            results[name] = Failure(f"unchecked: the reference {reference!r} failed ({failure.reason})", failure.transient)
            continue
        try:
            ms_c, failure_c, _ = _checked(name, candidate, ref, device, timer)
            results[name] = failure_c or ms_c
        except Exception as err:
            results[name] = failure_of(err)
    return results
