"""Run cases: for each, check every provider against the float64 reference, then time them.

A provider is timed only after its check passes; one that is wrong is reported ``WRONG`` with its
error and never with a time. Ratios are to ``base`` measured in the same case of the same run.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .cases import Case
from .providers import Provider, Unavailable, describe
from .timing import peak_extra_mib, time_steps
from .workload import Workload, WrongResult, input_copies, reference_results


@dataclass
class Result:
    case: Case
    provider: str
    status: str  # "ok", "WRONG", "FAILED" (raised) or "skipped" (cannot run here)
    note: str = ""
    ms: float | None = None  # median of the calls
    q1_ms: float | None = None  # first and third quartiles of the calls
    q3_ms: float | None = None
    tflops: float | None = None
    max_rel_error: float | None = None
    peak_extra_mib: float | None = None
    ratio_to_base: float | None = None
    mem_ratio_to_base: float | None = None


def prepare(case: Case, provider: Provider, copies, expected) -> tuple[Workload, float]:
    """Build ``provider``'s workload for ``case`` and check it; returns it with its largest
    relative error. Raises ``Unavailable`` or ``WrongResult``."""
    reason = provider.unavailable(case)
    if reason:
        raise Unavailable(reason)
    workload = Workload(case, provider, copies)
    return workload, workload.check(expected[provider.lora, provider.reference_inputs])


def expected_results(case: Case, copies, providers: Iterable[Provider]) -> dict[tuple, dict]:
    """Float64 reference results of ``copies[0]`` for each ``(lora, reference_inputs)`` of
    ``providers``: LoRA providers or ``base``, on the inputs as given or as a provider stores them
    (the 4-bit providers' W is its dequantization)."""
    keys = {(p.lora, p.reference_inputs) for p in providers if not p.unavailable(case)}
    return {
        (lora, inputs): reference_results(inputs(copies[0]) if inputs else copies[0], case.mode, lora)
        for lora, inputs in keys
    }


def _checked(case: Case, provider: Provider, copies, expected) -> Result | tuple[Workload, float]:
    """The checked workload with its error, or the Result of a provider that cannot be timed:
    skipped, WRONG or FAILED (a crash of one provider must not lose the rest of the run)."""
    try:
        return prepare(case, provider, copies, expected)
    except Unavailable as err:
        return Result(case, provider.name, "skipped", note=str(err))
    except WrongResult as err:
        return Result(case, provider.name, "WRONG", note=str(err))
    except Exception as err:
        return Result(case, provider.name, "FAILED", note=describe(err))


def run_case(case: Case, providers: Iterable[Provider]) -> list[Result]:
    """Check every provider on ``case``, then time those that passed, interleaved (see ``timing``);
    ratios are to ``base`` when it is among them."""
    providers = list(providers)
    copies = input_copies(case)
    expected = expected_results(case, copies, providers)
    outcomes = [(p, _checked(case, p, copies, expected)) for p in providers]
    ready = [(p, *outcome) for p, outcome in outcomes if not isinstance(outcome, Result)]
    timings = time_steps([workload.timed for _, workload, _ in ready], case.device)
    timed_results = {}
    for (provider, workload, error), (ms, q1_ms, q3_ms) in zip(ready, timings):
        peak = peak_extra_mib(workload.timed, case.device) if case.mode == "train" else None
        tflops = case.flops(provider.lora) / (ms * 1e-3) / 1e12
        describe = workload.layers[0].describe
        timed_results[provider.name] = Result(
            case, provider.name, "ok", ms=ms, q1_ms=q1_ms, q3_ms=q3_ms, tflops=tflops, max_rel_error=error,
            peak_extra_mib=peak, note=describe() if describe else "",
        )
    results = [timed_results.get(p.name, outcome) for p, outcome in outcomes]
    _add_ratios(results)
    return results


def _add_ratios(results: list[Result]) -> None:
    base = next((r for r in results if r.provider == "base" and r.status == "ok"), None)
    if base is None:
        return
    for r in results:
        if r.status == "ok":
            r.ratio_to_base = r.ms / base.ms
            if r.peak_extra_mib is not None and base.peak_extra_mib:
                r.mem_ratio_to_base = r.peak_extra_mib / base.peak_extra_mib


def run(cases: Iterable[Case], providers: list[Provider]) -> Iterator[list[Result]]:
    """``run_case`` on each case in turn, yielding its results."""
    for case in cases:
        yield run_case(case, providers)
        gc.collect()
        if case.device != "cpu":
            torch.cuda.empty_cache()
