"""``fastlora census``: the counters on known calls, and the CI gate (no count above the committed baseline).

The gate runs the census in a subprocess without ``TRITON_INTERPRET`` (which the suite sets, and which
changes the triton launch path) and fails, naming each count that rose and the command that
regenerates the baseline, when a launch, memset, allocation, ATen op or (under the baseline's
torch/triton/peft versions) Python call was added to a call. Counts only: host µs are too noisy for CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlora.census import BASELINE, REGENERATE, compare, failure_message, row_key
from fastlora.census.counting import PythonCalls, StubCompute, count_call

ROOT = Path(__file__).resolve().parent.parent


def test_stub_counts_each_kind_and_computes_nothing():
    big = torch.empty(8192, 4096)  # uninitialised: a real mm of these would take seconds here

    def call():
        flags = torch.zeros(512, dtype=torch.int32)
        out = torch.empty(8192, 8192)
        out.fill_(1.0)
        y = torch.mm(big, big.t())
        return flags, out, y.t()

    counts = count_call(call)
    assert (counts["memsets"], counts["allocs"], counts["compute"]) == (2, 1, 1)
    assert counts["views"] == 2  # the two .t()
    assert counts["aten"]["aten.mm.default"] == 1 and counts["launches"] == 0
    with StubCompute():
        y = torch.mm(big, big.t())
    assert y.shape == (8192, 8192) and y.dtype == torch.float32


def test_python_calls_leave_out_the_counting_mode():
    def two_frames():
        return torch.compiler.is_compiling()

    a = torch.randn(4, 4)

    def counted():
        mode = StubCompute(stub=False)
        with mode, PythonCalls() as python:
            two_frames()
            torch.mm(a, a).add_(1)  # ops dispatched through the mode add no Python calls
        return python.calls, sum(mode.ops.values())

    counted()  # the first dispatch through a mode imports and caches (not a call's cost)
    with PythonCalls() as plain:
        two_frames()
    assert plain.calls >= 2
    assert counted() == (plain.calls, 2)


def test_triton_launches_are_counted_not_run():
    pytest.importorskip("triton")
    from fastlora.census import Problem, count_subject

    rows = count_subject("triton", Problem(8192, 256, 128, 16, "bf16", 0.0))
    forward = next(r for r in rows if r["op"] == "forward")
    assert forward["launches"] >= 1 and forward["kernels"][0] == "_lora_gemm_kernel"


def _row(op="forward", **counts):
    base = {"launches": 1, "memsets": 1, "allocs": 2, "compute": 0, "views": 4, "python_calls": 70}
    return {"subject": "triton", "op": op, "problem": "M8192 K4096 N4096 r16 bf16 p0", "arch": "90a", **base, **counts}


def test_compare_names_the_count_that_rose_and_how_to_regenerate():
    versions = {"python": "3", "torch": "t", "triton": "x", "peft": "p"}
    was = _row()
    baseline = {"versions": versions, "counts": {row_key(was): {k: was[k] for k in ("launches", "memsets", "python_calls")}}}
    assert compare(baseline, [_row(memsets=0, python_calls=60)], versions) == []  # going down is fine
    problems = compare(baseline, [_row(memsets=2)], versions)
    assert problems == [f"{row_key(was)}: memsets rose from 1 to 2"]
    message = failure_message(problems, "b.json")
    assert "memsets rose from 1 to 2" in message and REGENERATE in message
    # Python calls are not compared under another torch: its own Python is not fastlora's regression.
    assert compare(baseline, [_row(python_calls=99)], {**versions, "torch": "other"}) == []
    assert compare(baseline, [_row(python_calls=99)], versions) == [f"{row_key(was)}: python_calls rose from 70 to 99"]
    missing = compare(baseline, [], versions)
    assert len(missing) == 1 and "not in this census" in missing[0]


def test_no_count_rose_above_the_committed_baseline(tmp_path):
    """The CI gate. Regenerate the baseline after an intended change: ``python -m fastlora census --write-baseline``."""
    pytest.importorskip("peft")
    assert BASELINE.exists(), f"no census baseline at {BASELINE}; write it with `{REGENERATE}`"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    report = tmp_path / "census.json"
    done = subprocess.run([sys.executable, "-m", "fastlora", "census", "--check", "--json", str(report)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    measured = [r for r in rows if "note" not in r]
    assert measured and {r["subject"] for r in measured} >= {"torch", "triton", "auto", "peft", "peft+patch(auto)"}
    assert done.returncode == 0, done.stderr[-5000:]
