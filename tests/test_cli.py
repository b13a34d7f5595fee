"""Quick CPU tests of ``python -m fastlora demo`` and ``bench`` on tiny shapes."""

from __future__ import annotations

import csv
import json
import sys

import pytest

import fastlora
from fastlora import reference
from fastlora.__main__ import main
from fastlora.bench.providers import PROVIDERS, Layer, Provider

TINY = ["bench", "--device", "cpu", "--shapes", "48x64x32", "--ranks", "4"]


def test_demo_passes_its_checks_and_times_both_with_their_spread(capsys):
    assert main(["demo", "--device", "cpu", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out and "tolerance 1e-05" in out
    assert "forward" in out and "training step" in out and "over 3 repeats, min / median / max" in out
    verdicts = ("fused faster (", "naive faster (", "within the noise (")
    assert sum(out.count(v) for v in verdicts) == 2  # one per timed step


def test_bench_writes_table_json_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = {ext: tmp_path / f"out.{ext}" for ext in ("json", "csv", "md", "png")}
    argv = TINY + ["--modes", "train,decode", "--providers", "naive,addmm,fastlora-torch,fastlora-cuda,fastlora-auto"]
    argv += ["--json", str(paths["json"]), "--csv", str(paths["csv"]), "--markdown", str(paths["md"]), "--plot", str(paths["png"])]
    assert main(argv) == 0

    rows = json.loads(paths["json"].read_text())["results"]
    assert {(r["mode"], r["M"]) for r in rows} == {("train", 48), ("decode", 48)}  # MxKxN fixes M
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"base", "naive", "addmm", "fastlora-torch", "fastlora-auto"}
    assert all(r["ms"] > 0 and r["max_rel_error"] < 1e-4 for r in ok)
    assert all(r["ratio_to_base"] == 1 for r in ok if r["provider"] == "base")
    assert {r["status"] for r in rows if r["provider"] == "fastlora-cuda"} == {"skipped"}
    assert {r["note"] for r in rows if r["provider"] == "fastlora-auto"} == {
        "auto → torch: cpu tensors run on the torch backend; no timing"
    }

    with open(paths["csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    out = capsys.readouterr().out
    assert out == paths["md"].read_text() + "\n"
    assert "### train" in out and "× base" in out
    assert "backend='auto' (fastlora-auto): torch (cpu tensors; no timing)" in out
    # The header says which backends the run times, and why not the others.
    assert "torch: available" in out
    for name, status in fastlora.available_backends().items():
        if name == "torch":
            continue
        if status.available:
            assert f"{name}: available, not timed on cpu: the {name} backend runs on CUDA tensors" in out
        else:
            assert f"{name}: unavailable: " in out
    assert paths["png"].read_bytes().startswith(b"\x89PNG")


def _scaled_naive(factor: float):
    def build(inp):
        def forward(x):
            return reference.lora_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling * factor)

        return Layer(forward, inp.lora_A, inp.lora_B)

    return build


def _crash(inp):
    raise RuntimeError("kernel launch failed")


def test_bench_refuses_to_time_a_wrong_or_crashing_provider(tmp_path, capsys):
    registry = {
        **PROVIDERS,
        "half-scaling": Provider("half-scaling", _scaled_naive(0.5)),
        "crashing": Provider("crashing", _crash),
    }
    out_json = tmp_path / "out.json"
    argv = TINY + ["--modes", "forward", "--providers", "half-scaling,crashing", "--json", str(out_json)]
    assert main(argv, providers=registry) == 1

    rows = {r["provider"]: r for r in json.loads(out_json.read_text())["results"]}
    assert rows["half-scaling"]["status"] == "WRONG" and rows["half-scaling"]["ms"] is None
    assert "relative error" in rows["half-scaling"]["note"]
    assert rows["crashing"]["status"] == "FAILED" and "kernel launch failed" in rows["crashing"]["note"]
    assert rows["base"]["status"] == "ok"
    table_rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|") and "half-scaling" in line]
    assert table_rows and all("WRONG" in row for row in table_rows)  # summaries and table: never a time


def test_bench_writes_each_case_as_it_finishes(tmp_path):
    """A run stopped in its second case (a timeout's kill, here an interrupt) keeps the first's rows."""
    starts, interrupt = [], [True]

    def interrupt_in_the_second_case():
        starts.append(1)
        if interrupt[0] and len(starts) == 2:
            raise KeyboardInterrupt  # not an Exception: the runner does not catch it, as it cannot catch a kill

    registry = {**PROVIDERS, "stops": Provider("stops", _scaled_naive(1.0), start_case=interrupt_in_the_second_case)}
    paths = {ext: tmp_path / f"out.{ext}" for ext in ("json", "csv", "md")}
    argv = TINY + ["--modes", "forward,train", "--providers", "stops", "--json", str(paths["json"]),
                   "--csv", str(paths["csv"]), "--markdown", str(paths["md"])]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        main(argv, providers=registry)
    data = json.loads(paths["json"].read_text())
    assert {(r["mode"], r["provider"], r["status"]) for r in data["results"]} == {("forward", "base", "ok"), ("forward", "stops", "ok")}
    assert data["machine"]["complete"] == "no: 1 of 2 cases"
    with open(paths["csv"], newline="") as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["forward", "forward"]
    assert "**Partial run**" in paths["md"].read_text() and "### forward" in paths["md"].read_text()
    assert not list(tmp_path.glob("*.partial"))  # every file was replaced whole

    interrupt[0] = False
    assert main(argv, providers=registry) == 0  # no interrupt now: the full run, marked complete
    data = json.loads(paths["json"].read_text())
    assert data["machine"]["complete"] == "yes" and {r["mode"] for r in data["results"]} == {"forward", "train"}
    assert "Partial run" not in paths["md"].read_text()


def test_bench_without_its_extra_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # how Python spells "not installed"
    with pytest.raises(SystemExit) as exit_info:
        main(TINY)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install tqdm" in err and "pip install -e '.[bench]'" in err and "fastlora[" not in err


@pytest.mark.parametrize("bad", [["--shapes", "4096by4096"], ["--dtypes", "fp8"], ["--providers", "nope"]])
def test_bench_rejects_bad_options(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(TINY[:3] + bad)
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_gpu_session_fits_its_budget():
    """benchmarks/gpu_session.sh: each command's step limits under 8 minutes, both together under
    13 minutes less a fresh machine's start (about a minute; 2 of the 15 left for the idle time
    between them and a slow start), and the script parses."""
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    first, second = text.split('if [[ $part == first ]]; then', 1)[1].split("\nelse\n", 1)
    shared = text.split('if [[ $part == first ]]; then', 1)[0]

    def limits(part: str) -> list[int]:
        return [int(s) for s in re.findall(r"^\s*(?:if ! )?step \S+ (\d+) ", part, re.MULTILINE)]

    totals = [sum(limits(shared) + limits(part)) for part in (first, second)]
    assert all(len(limits(part)) >= 2 for part in (first, second))
    assert max(totals) <= 8 * 60 and sum(totals) + 60 <= 13 * 60, totals
    for total in totals:  # the header states the budget it keeps
        assert f"= {total} s" in text
