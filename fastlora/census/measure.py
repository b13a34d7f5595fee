"""The census itself: every subject × op × problem counted (``counting.count_call``), as rows.

A row is ``{"subject", "op", "problem", "launches", "memsets", "allocs", "compute", "views",
"python_calls", "aten", "kernels"}``, or ``{"subject", "op", "problem", "note"}`` where the subject
cannot be measured here. ``forward`` is a training forward (grad enabled, train mode, LoRA dropout as
the problem says); ``backward`` is ``torch.autograd.grad`` of that forward's output with respect to
``x``, ``lora_A`` and ``lora_B`` (the forward not counted); ``decode`` an inference forward (no grad,
eval mode). Each is run once before it is counted, so that first-call work (loading, caching) is not.
"""

from __future__ import annotations

import torch

from .counting import StubCompute, count_call, stubbed_triton
from .subjects import SUBJECTS, Problem, make_subject, not_measurable, ops_of, subject_context

COUNTS = ("launches", "memsets", "allocs", "compute", "scalar", "views", "python_calls")


def _quietly(call):
    """``call()`` with compute and launches stubbed, nothing counted (building, a forward to backprop)."""
    with stubbed_triton([]), StubCompute():
        return call()


def _counted(call) -> dict:
    # The warm-up, as a training loop's first steps: the first call plans its launches (Triton's path,
    # then _prebound), the second records its host programs (_host_programs); the counted call replays.
    count_call(call)
    count_call(call)
    return count_call(call)


def count_subject(name: str, problem: Problem, arch: str = "90a") -> list[dict]:
    """The rows of one subject on one problem, every op of ``ops_of(problem)``."""
    head = {"subject": name, "problem": problem.label, "arch": arch}
    why = not_measurable(name)
    if why is not None:
        return [{**head, "op": op, "note": why} for op in ops_of(problem)]
    rows = []
    with subject_context(name, arch):
        subject = _quietly(lambda: make_subject(name, problem))
        for op in ops_of(problem):
            if subject.module is not None:
                subject.module.train(op != "decode")
            if op == "forward":
                counts = _counted(subject.call)
            elif op == "backward":
                y = _quietly(subject.call)
                gy = _quietly(lambda: torch.empty_like(y))
                counts = _counted(lambda: torch.autograd.grad(y, subject.inputs, gy, retain_graph=True))
            else:
                with torch.no_grad():
                    counts = _counted(subject.call)
            rows.append({**head, "op": op, **counts})
    return rows


def run_census(problems: list[Problem], subjects=SUBJECTS, archs=("90a",), progress=None) -> list[dict]:
    """Every row of ``subjects`` × ``problems`` × ``archs``; ``progress()`` is called after each subject."""
    rows = []
    for arch in archs:
        for problem in problems:
            for name in subjects:
                rows.extend(count_subject(name, problem, arch))
                if progress is not None:
                    progress()
    return rows


def row_key(row: dict) -> str:
    """How a row is named in the baseline and in a failure message."""
    return f"{row['subject']} | {row['op']} | {row['problem']} | sm_{row['arch']}"
