"""``python -m fastlora doctor``, run as a user runs it (a subprocess), on the CPU.

The faults a GPU may show (a hang, a process killed by a fault, a wrong result) are made with the
checks' test hook ``FASTLORA_DOCTOR_FAULT`` (``fastlora.doctor.checks``): the doctor must name each
one in its verdict and exit 1, and a clean run must exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastlora.doctor as doctor
from fastlora.doctor._children import ChildResult
from fastlora.doctor.checks import DENSE, problems_for
from fastlora.doctor.report import verdict_of

ROOT = Path(__file__).resolve().parents[1]


def run_doctor(tmp_path, *args, fault=None, interpret=False, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_DOCTOR_FAULT")}
    env.update(FASTLORA_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if fault:
        env["FASTLORA_DOCTOR_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fastlora", "doctor", "--device", "cpu", *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)  # fmt: skip


def verdict_lines(stdout: str) -> dict[str, str]:
    lines = stdout.split("verdicts:\n", 1)[1].splitlines()
    return dict(line.strip().split(": ", 1) for line in lines if line.startswith("  "))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_cpu_run_passes_prints_a_verdict_per_backend_and_caches_them(cache_dir):
    done = run_doctor(cache_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = verdict_lines(done.stdout)
    assert set(verdicts) == {"torch", "triton", "cuda", "triton-4bit"}
    assert verdicts["torch"].startswith(f"pass ({len(problems_for('torch', 'cpu'))} problems")
    assert verdicts["triton"].startswith("unavailable: ") and "TRITON_INTERPRET=1" in verdicts["triton"]
    assert verdicts["cuda"].startswith("unavailable: ") and verdicts["triton-4bit"].startswith("unavailable: ")
    assert f"torch: {torch.__version__}" in done.stdout and "fastlora._C: " in done.stdout  # what is installed
    assert "triton is not checked" in done.stdout  # says why triton was left out on the CPU
    # Unavailable backends are not stored: auto must not read "unavailable" as "failed".
    assert doctor.cached_verdicts("cpu") == {"torch": True}


def test_json_report_holds_every_problems_errors_within_the_table(cache_dir):
    done = run_doctor(cache_dir, "--json", "--backends", "torch")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # stdout is the JSON alone; progress went to stderr
    assert report["exit_status"] == 0 and report["time_table"] is None and report["environment"]["device"] == "cpu"
    torch_verdict = report["backends"]["torch"]
    assert torch_verdict["verdict"] == "pass"
    problems = torch_verdict["problems"]
    assert [p["problem"] for p in problems] == [p.name for p in DENSE if not p.gpu_only]
    for p in problems:
        assert p["ok"] and {"forward", "grad x", "grad bias", "grad lora_A", "grad lora_B"} <= set(p["errors"])
        assert 0 < max(p["errors"].values()) <= p["tolerance"]  # measured, not zeros
    assert "grad weight" in problems[2]["errors"]


def test_a_hang_is_killed_and_reported_as_a_timeout_naming_its_problem(cache_dir):
    first = DENSE[0].name
    done = run_doctor(cache_dir, "--backends", "torch", "--timeout", "25", fault=f"torch:hang:{first}")
    assert done.returncode == 1
    assert verdict_lines(done.stdout)["torch"] == f"fail: timed out after 25 s in problem {first!r} (killed)"
    assert doctor.cached_verdicts("cpu") == {"torch": False}


def test_a_wrong_backend_fails_naming_the_problem_and_the_error(cache_dir):
    target = DENSE[3].name
    done = run_doctor(cache_dir, "--backends", "torch", fault=f"torch:wrong:{target}")
    assert done.returncode == 1
    verdict = verdict_lines(done.stdout)["torch"]
    assert verdict.startswith(f"fail: {target}: forward ") and "grad" not in verdict  # gradients stay right
    assert sum("FAIL" in line for line in done.stdout.splitlines()) == 1  # the other problems passed


def test_a_crashed_check_is_reported_not_inherited(cache_dir):
    done = run_doctor(cache_dir, "--backends", "torch", fault="torch:abort")
    assert done.returncode == 1
    assert verdict_lines(done.stdout)["torch"].startswith(f"fail: the check process died (killed by SIGABRT) in problem {DENSE[0].name!r}")


@pytest.mark.slow
def test_triton_under_the_interpreter_passes_when_the_user_asks_for_it(cache_dir):
    done = run_doctor(cache_dir, "--backends", "triton", interpret=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdict_lines(done.stdout)["triton"].startswith("pass (")
    assert "triton is checked under Triton's interpreter" in done.stdout


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_available_backend_passes_on_the_gpu(tmp_path):
    env = {**os.environ, "FASTLORA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "fastlora", "doctor", "--device", "cuda", "--no-timing"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_verdicts_from_child_records():
    ok = {"problem": "p", "ok": True, "errors": {"forward": 1e-3}, "tolerance": 1e-2, "detail": "ok"}
    bad = {**ok, "problem": "q", "ok": False, "detail": "grad x 5.00e-01"}
    assert verdict_of(ChildResult([{"start": "p"}, ok], False, 0, "", 1.0), 60)["verdict"] == "pass"
    failed = verdict_of(ChildResult([{"start": "p"}, ok, {"start": "q"}, bad], False, 0, "", 1.0), 60)
    assert failed["verdict"] == "fail" and failed["detail"] == "q: grad x 5.00e-01"
    assert verdict_of(ChildResult([], True, None, "", 60.0), 60)["detail"] == "timed out after 60 s before the first problem (killed)"
    died = verdict_of(ChildResult([{"start": "p"}], False, 1, "Traceback\nRuntimeError: CUDA error: an illegal memory access", 1.0), 60)
    assert died["detail"] == "the check process died (exit status 1) in problem 'p': RuntimeError: CUDA error: an illegal memory access"
    assert verdict_of(ChildResult([], False, 0, "", 1.0), 60)["verdict"] == "fail"  # silence is not a pass
    assert verdict_of(ChildResult([{"unavailable": "why"}], False, 0, "", 1.0), 60) == {"verdict": "unavailable", "detail": "why", "problems": []}


def test_cached_verdicts_ignore_a_corrupt_file_and_other_environments(cache_dir):
    assert doctor.cached_verdicts("cpu") == {}
    (cache_dir / "doctor.json").write_text("{not json")
    assert doctor.cached_verdicts("cpu") == {}
    pass_ = {"verdict": "pass", "detail": "ok"}
    doctor.store_verdicts(torch.device("cpu"), {"torch": pass_, "cuda": {"verdict": "unavailable", "detail": "no GPU"}}, "now")
    data = json.loads((cache_dir / "doctor.json").read_text())
    (env,) = data["environments"]
    data["environments"]["another GPU | driver 1 | torch 0 | triton 0 | fastlora 0"] = {"verdicts": {"torch": {"pass": False}}}
    (cache_dir / "doctor.json").write_text(json.dumps(data))
    assert doctor.cached_verdicts("cpu") == {"torch": True}


@pytest.mark.parametrize("bad", [["--backends", "trtion"], ["--timeout", "0"], ["--backends", ","]])
def test_bad_options_are_named(bad, capsys):
    from fastlora.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--device", "cpu", *bad])
    assert exit_.value.code == 2
    assert bad[0] in capsys.readouterr().err
