"""Run PEFT's own ``tests/test_custom_models.py`` (LoRA and DoRA cases) plain and with
``fastlora.patch_peft`` applied to every model the tests build, and compare test by test.

    PYTHONPATH=$PWD python benchmarks/peft_suite.py [--sdist peft-X.tar.gz] [--out report.md]

PEFT's tests are not installed with the wheel: the sdist of the installed PEFT version is unpacked
into a temporary directory (downloaded with ``pip download --no-deps --no-binary :all:`` when
``--sdist`` is not given); nothing of PEFT's is kept in this repository. Both runs are the same
``pytest`` command in a subprocess with ``-p peft_suite_plugin`` (benchmarks/peft_suite_plugin.py:
the selection, stubs for ``diffusers`` / ``datasets``, per-test counts of fused calls); the patched
run sets ``FASTLORA_PEFT_SUITE_PATCH=1``. Outcomes come from ``--junitxml``. ``HF_HUB_OFFLINE=1``:
tests that need a Hub model are deselected by default, and any left fail fast in both runs.

Exit status: 0 when every test passed by the plain run passes patched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# DoRA cases in full (every node id naming DoRA); LoRA: TestPeftCustomModel's cases of every
# LoraConfig on the MLP and on GPT-2's Conv1D model (plain LoRA, and the non-DoRA variants, which
# patch_peft leaves on PEFT), and the LoRA tests of the multi-adapter, mixed-batch, requires-grad,
# repr, dispatch and default-target classes. Not: LoRA on Conv/Embedding/MHA models and the other
# tuners (AdaLoRA, VBLoRA, ...), whose layers patch_peft never patches.
DEFAULT_SELECT = (
    r"(?i:dora)"
    r"|TestPeftCustomModel.*\[(Vanilla MLP [0-9]+ LoRA|Embedding \+ transformers Conv1D [0-9]+ LoRA)"
    r"|(TestMultipleActiveAdapters|TestRequiresGrad|TestMixedAdapterBatches|TestLayerRepr|TestDynamicDispatch"
    r"|TestDefaultTargetModules)::.*(?i:lora)"
)
# FSDP (needs torch.distributed process groups), tests that load a model from the Hub, and a
# timing test (a loaded machine makes it flaky in either run).
DEFAULT_EXCLUDE = r"TestPeftFsdpStateDict|gpt2|test_dora_save_and_load_remapping|_timing"

PYTEST_INI = """[pytest]
markers =
    single_gpu_tests: PEFT marker
    multi_gpu_tests: PEFT marker
    regression: PEFT marker
    bitsandbytes: PEFT marker
"""


def peft_version() -> str:
    import peft

    return peft.__version__


def unpack_sdist(sdist: Path | None, work: Path) -> Path:
    """The unpacked PEFT source tree (with ``tests/``) under ``work``."""
    if sdist is None:
        spec = f"peft=={peft_version()}"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(work)],
            check=True,
        )
        sdist = next(work.glob("peft-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    (src,) = [p for p in work.iterdir() if p.is_dir() and (p / "tests" / "test_custom_models.py").exists()]
    # PEFT's tests import each other relatively (`from .testing_common import ...`), and its
    # pyproject adds --cov options: a package marker and a plain ini of our own.
    (src / "tests" / "__init__.py").touch()
    (src / "pytest.ini").write_text(PYTEST_INI)
    return src


def run_suite(src: Path, work: Path, label: str, patch: bool, args) -> dict:
    junit, log = work / f"{label}.xml", work / f"{label}.jsonl"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HUB_OFFLINE="1",
        FASTLORA_PEFT_SUITE_SELECT=args.select,
        FASTLORA_PEFT_SUITE_EXCLUDE=args.exclude,
        FASTLORA_PEFT_SUITE_LOG=str(log),
        FASTLORA_PEFT_SUITE_BACKEND=args.backend,
        FASTLORA_PEFT_SUITE_PATCH="1" if patch else "0",
        FASTLORA_PEFT_SUITE_SABOTAGE=str(args.sabotage) if patch else "1",
    )
    cmd = [
        sys.executable, "-m", "pytest", "-c", "pytest.ini", "--rootdir", ".", "-p", "peft_suite_plugin",
        "-p", "no:cacheprovider", "-q", "-rN", "--tb=short", f"--junitxml={junit}", "tests/test_custom_models.py",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.monotonic() - start
    if not junit.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{label} run wrote no junit xml (exit {proc.returncode})")
    counts = {}
    if log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            counts[row.pop("nodeid")] = row
    return {"outcomes": parse_junit(junit), "seconds": seconds, "returncode": proc.returncode, "counts": counts}


def parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first line of the message)}``, outcome one of passed/failed/error/skipped."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = failure_reason(child.get("message") or "", child.text or "")
                break
        # A teardown error is a second entry for the same id: keep the worse outcome.
        if test_id not in outcomes or outcomes[test_id][0] == "passed":
            outcomes[test_id] = (outcome, message)
    return outcomes


def command_line(args) -> str:
    """The command that reproduces this run, as a user would type it."""
    words = ["TRITON_INTERPRET=1"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    words += ["PYTHONPATH=$PWD", "python", "benchmarks/peft_suite.py"]
    if args.sdist:
        words += ["--sdist", args.sdist.name]
    if args.backend != "auto":
        words += ["--backend", args.backend]
    if args.select != DEFAULT_SELECT:
        words += ["--select", repr(args.select)]
    if args.exclude != DEFAULT_EXCLUDE:
        words += ["--exclude", repr(args.exclude)]
    if args.sabotage != 1.0:
        words += ["--sabotage", str(args.sabotage)]
    return " ".join(words)


def failure_reason(message: str, text: str) -> str:
    """One line: the test's location in PEFT's files and the assertion or exception (``E`` lines of
    ``--tb=short``), the junit message where there are none."""
    lines = text.splitlines()
    where = [line.strip() for line in lines if line.startswith("tests/") or line.startswith("tests\\")]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    reason = " ".join(errors[:3]) if errors else message.strip().splitlines()[0] if message.strip() else ""
    return (f"{where[-1]}: " if where else "") + reason[:400]


def report(runs: dict, args, selected_note: str) -> tuple[str, int]:
    plain, patched = runs["plain"]["outcomes"], runs["patched"]["outcomes"]
    from fastlora._quiet import quiet_foreign_logs

    quiet_foreign_logs()  # bitsandbytes' Hub-kernel message when peft imports it on a CPU
    import peft
    import torch
    import transformers

    lines = [
        f"# PEFT's test_custom_models.py with and without fastlora.patch_peft ({time.strftime('%Y-%m-%d')})",
        "",
        f"- peft {peft.__version__} (tests from its sdist), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {sys.version.split()[0]}, CPU (no GPU); patch_peft backend={args.backend!r}",
        f"- command: `{command_line(args)}`",
        f"- selection (regex on node ids): `{args.select}`; excluded: `{args.exclude}`",
        f"- {selected_note}",
        "",
        "| run | tests | passed | failed | errors | skipped | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        tally = collections.Counter(outcome for outcome, _ in run["outcomes"].values())
        lines.append(
            f"| {label} | {len(run['outcomes'])} | {tally['passed']} | {tally['failed']} | {tally['error']} "
            f"| {tally['skipped']} | {run['seconds']:.0f} |"
        )
    counts = runs["patched"]["counts"]
    fused = [t for t, c in counts.items() if c["fused_lora_calls"] or c["fused_dora_calls"]]
    dora = [t for t, c in counts.items() if c["fused_dora_calls"]]
    patched_any = [t for t, c in counts.items() if c["patched_layers"]]
    lines += [
        "",
        f"Patched run: {len(patched_any)} tests built a model that patch_peft patched; {len(fused)} ran at least "
        f"one forward on fastlora's fused path ({len(dora)} of them a fused DoRA forward), "
        f"{sum(c['fused_lora_calls'] for c in counts.values())} fused LoRA and "
        f"{sum(c['fused_dora_calls'] for c in counts.values())} fused DoRA forward calls in all. "
        "The rest target layers patch_peft leaves on PEFT (Conv1d/2d/3d, Embedding) or only ever ran "
        "PEFT's forward (merged, disabled, several active adapters).",
        "",
    ]
    differing = sorted(t for t in set(plain) | set(patched) if plain.get(t, ("absent",))[0] != patched.get(t, ("absent",))[0])
    regressions = [t for t in differing if plain.get(t, ("",))[0] == "passed"]
    lines.append(f"## Tests whose outcome differs ({len(differing)}; {len(regressions)} pass plain and not patched)")
    lines.append("")
    if not differing:
        lines.append("None.")
    for test in differing:
        p, q = plain.get(test, ("absent", "")), patched.get(test, ("absent", ""))
        lines.append(f"- `{test}`: plain {p[0]}, patched {q[0]}: {q[1] or p[1]}")
    failing_both = sorted(t for t in plain if plain[t][0] in ("failed", "error") and patched.get(t, ("",))[0] == plain[t][0])
    lines += ["", f"## Tests failing in both runs ({len(failing_both)})", ""]
    by_reason = collections.defaultdict(list)
    for test in failing_both:
        by_reason[plain[test][1][:160]].append(test)
    for reason, tests in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {len(tests)} × `{reason}`: e.g. `{tests[0]}`")
    if not failing_both:
        lines.append("None.")
    return "\n".join(lines) + "\n", 1 if regressions else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="PEFT sdist (.tar.gz) of the installed version; downloaded if omitted")
    parser.add_argument("--select", default=DEFAULT_SELECT, help="regex on node ids to run")
    parser.add_argument("--exclude", default=DEFAULT_EXCLUDE, help="regex on node ids to deselect")
    parser.add_argument("--backend", default="auto", help="patch_peft's backend")
    parser.add_argument("--out", type=Path, help="write the markdown report here (else stdout)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument(
        "--sabotage", type=float, default=1.0,
        help="scale every fused forward's output by this in the patched run (1.01: check that the comparison can fail)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (junit xml, logs)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="peft_suite_"))
    src = unpack_sdist(args.sdist.resolve() if args.sdist else None, work)
    runs = {}
    for label, patch in (("plain", False), ("patched", True)):
        runs[label] = run_suite(src, work, label, patch, args)
        print(f"{label}: {len(runs[label]['outcomes'])} tests in {runs[label]['seconds']:.0f} s", file=sys.stderr)
    sdist = args.sdist.name if args.sdist else "downloaded with pip"
    note = f"sdist: {sdist}; work dir {work}" + ("" if args.keep else " (removed)")
    text, status = report(runs, args, note)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
