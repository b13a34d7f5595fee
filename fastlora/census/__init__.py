"""``fastlora census``: what each call costs outside the kernels, counted on a CPU.

For every backend (torch, triton, cuda where it can run, auto, auto after it decided triton) and
PEFT's ``lora.Linear`` before and after ``patch_peft``, × op (training forward, backward, decode) ×
problem (M 64 and 8192, K = N = 4096, r = 16, bf16 with bf16 or fp32 adapters, dropout off and on):
Triton launches (stubbed through ``fastlora.inspect``'s recording machinery, with the target GPU's
limits standing in), memsets, allocations and other ATen ops (a ``TorchDispatchMode`` that also
stubs their compute, so full-size problems cost nothing), and Python calls (``sys.setprofile``).
A second table times the host path per call on tiny tensors (``host``).

The counts are CI-gated (``tests/test_census.py``) against ``benchmarks/results/census-baseline.json``;
after an intended change, ``python -m fastlora census --write-baseline`` regenerates it.

Modules: ``counting`` (the counters and stubs), ``subjects`` (what is called), ``measure`` (the
rows), ``host`` (µs), ``report`` (markdown, JSON, baseline, the command).
"""

from __future__ import annotations

from .measure import COUNTS, count_subject, row_key, run_census  # noqa: F401
from .report import BASELINE, REGENERATE, add_arguments, baseline_of, compare, failure_message, run  # noqa: F401
from .subjects import SUBJECTS, Problem, default_problems  # noqa: F401
