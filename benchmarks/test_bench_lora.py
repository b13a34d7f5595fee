"""pytest-benchmark view of ``fastlora bench``: one test per (case, provider), grouped by case so
that each group's table compares the providers of one shape and mode.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]
    FASTLORA_BENCH_GRID=default pytest benchmarks/ --benchmark-only   # or full; default: smoke

Cases and providers come from ``fastlora.bench`` (the same as the command line). Each test first
checks the provider against the float64 reference (it fails if wrong), then times one call per
round, its setup (next input copy, gradients to None, the forward of ``backward``) untimed; on a
GPU each round ends with a synchronisation. The GPU cases are marked ``gpu``: skipped without one.
"""

from __future__ import annotations

import functools
import os

import pytest

from fastlora.bench.cases import GRIDS, Case, make_cases
from fastlora.bench.providers import PROVIDERS, Unavailable
from fastlora.bench.runner import expected_results, prepare
from fastlora.bench.timing import peak_extra_mib, repeats, synchronized, warm_up
from fastlora.bench.workload import input_copies

GRID = os.environ.get("FASTLORA_BENCH_GRID", "smoke")
PARAMS = [
    pytest.param(
        case,
        name,
        id=f"{case.device}-{case.mode}-M{case.M}-{case.shape.K}x{case.shape.N}-r{case.r}-{case.dtype}-{name}",
        marks=[pytest.mark.gpu] if device == "cuda" else [],
    )
    for device in ("cpu", "cuda")
    for case in make_cases(GRIDS[device][GRID], device)
    for name in PROVIDERS
]


@functools.lru_cache(maxsize=1)  # the tests of a case are consecutive; keep one case's tensors
def _case_data(case: Case):
    copies = input_copies(case)
    return copies, expected_results(case, copies, PROVIDERS.values())


@pytest.mark.parametrize(("case", "provider_name"), PARAMS)
def test_lora_linear(benchmark, case: Case, provider_name: str):
    provider = PROVIDERS[provider_name]
    copies, expected = _case_data(case)
    try:
        workload, error = prepare(case, provider, copies, expected)
    except Unavailable as err:
        pytest.skip(str(err))

    benchmark.group = f"{case.device} {case.label}"
    benchmark.extra_info.update(max_rel_error=error, flop=case.flops(provider.lora))
    timed = workload.timed
    rounds = repeats(warm_up(timed, case.device)) if benchmark.enabled else 1
    benchmark.pedantic(
        synchronized(timed.step, case.device), setup=synchronized(timed.setup, case.device), rounds=rounds
    )
    if case.mode == "train" and case.device == "cuda":
        benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(timed, case.device)
