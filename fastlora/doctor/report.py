"""What ``fastlora doctor`` prints: the installation, each backend's checks as they finish, one
verdict line per backend, the time table; or all of it as JSON."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys

import torch

from ._children import ChildResult, describe_exit, run_child


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extension_archs() -> str:
    """Whether ``fastlora._C`` is built, and the SASS archs it carries (``cuobjdump --list-elf``)."""
    spec = importlib.util.find_spec("fastlora._C")
    if spec is None or not spec.origin:
        return "not built (backend 'cuda' unavailable; FASTLORA_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e .)"
    try:
        from triton import knobs

        done = subprocess.run([knobs.nvidia.cuobjdump.path, "--list-elf", spec.origin], capture_output=True, text=True, timeout=30)
        archs = sorted({part.split(".")[0] for line in done.stdout.split() for part in [line.rsplit("sm_", 1)[-1]] if "sm_" in line})
        return f"built at {spec.origin}, SASS for {', '.join('sm_' + a for a in archs) or 'no arch cuobjdump could list'}"
    except Exception as err:  # triton's cuobjdump missing or failing: say what is known
        return f"built at {spec.origin} (archs unknown: {type(err).__name__}: {err})"


def environment(device: str) -> dict:
    """What is installed, and the device the checks run on."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda or "none (a CPU build of torch)",
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "fastlora": _fastlora_version(),
        "fastlora._C": _extension_archs(),
        "device": device,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        from ..ops.auto import _driver_version

        info["driver"] = _driver_version()
    else:
        info["gpu"] = "none visible (torch.cuda.is_available() is False)"
    return info


def _fastlora_version() -> str:
    from .. import __version__

    return __version__


def verdict_of(result: ChildResult, timeout: float) -> dict:
    """``{"verdict": "pass"|"fail"|"unavailable", "detail", "problems"}`` from a check's child."""
    problems = [r for r in result.records if "problem" in r]
    unavailable = next((r["unavailable"] for r in result.records if "unavailable" in r), None)
    started = [r["start"] for r in result.records if "start" in r]
    finished = {r["problem"] for r in problems}
    pending = next((name for name in started if name not in finished), None)
    where = f"in problem {pending!r}" if pending else ("before the first problem" if not started else "after the last problem")
    if unavailable is not None:
        return {"verdict": "unavailable", "detail": unavailable, "problems": []}
    if result.timed_out:
        return {"verdict": "fail", "detail": f"timed out after {timeout:g} s {where} (killed)", "problems": problems}
    if result.returncode != 0:
        last = result.stderr_tail.splitlines()[-1] if result.stderr_tail else "no stderr"
        detail = f"the check process died ({describe_exit(result.returncode)}) {where}: {last}"
        return {"verdict": "fail", "detail": detail, "problems": problems}
    failed = [p for p in problems if not p["ok"]]
    if failed:
        more = f" (and {len(failed) - 1} more problem{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
        return {"verdict": "fail", "detail": f"{failed[0]['problem']}: {failed[0]['detail']}{more}", "problems": problems}
    if not problems:
        return {"verdict": "fail", "detail": "the check process reported no result", "problems": problems}
    worst = max(max(p["errors"].values()) / p["tolerance"] for p in problems)
    detail = f"{len(problems)} problems, forward and every gradient within tolerance (worst at {worst:.0%} of its bound)"
    return {"verdict": "pass", "detail": detail, "problems": problems}


def _say(text: str, as_json: bool) -> None:
    print(text, file=sys.stderr if as_json else sys.stdout, flush=True)


def _progress(backend: str, as_json: bool):
    def show(record: dict) -> None:
        if "problem" in record:
            worst = max(record["errors"].values(), default=float("nan"))
            status = "ok" if record["ok"] else f"FAIL: {record['detail']}"
            _say(f"  {backend:<12} {record['problem']:<42} max err {worst:.1e}  {status}", as_json)

    return show


def _time_table(backends: list[str], timeout: float, as_json: bool) -> dict:
    from .timing import SHAPE

    result = run_child("fastlora.doctor.timing", backends, timeout)
    rows = [r for r in result.records if "name" in r]
    table = {"shape": SHAPE, "rows": rows}
    if result.timed_out or result.returncode:
        table["error"] = f"timed out after {timeout:g} s" if result.timed_out else f"died ({describe_exit(result.returncode)}): {result.stderr_tail}"
    base = next((r for r in rows if r["name"].startswith("base") and "forward_ms" in r), None)
    lines = [f"time at M={SHAPE['M']} K={SHAPE['K']} N={SHAPE['N']} r={SHAPE['r']} {SHAPE['dtype']} (median ms, × base F.linear):",
             f"  {'':<16} {'forward':>18} {'forward+backward':>22}"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['name']:<16} failed: {r['error']}")
            continue
        cells = [f"{r[k]:8.3f} ({r[k] / base[k]:5.2f}×)" if base else f"{r[k]:8.3f}" for k in ("forward_ms", "train_ms")]
        lines.append(f"  {r['name']:<16} {cells[0]:>18} {cells[1]:>22}")
    if "error" in table:
        lines.append(f"  (the timing process {table['error']})")
    _say("\n".join(lines), as_json)
    return table


def doctor(backends: list[str], device: str, timeout: float, *, as_json: bool = False, timing: bool = True) -> int:
    """Check ``backends`` on ``device``, print the report; 0 if every available one passed."""
    from . import store_verdicts

    info = environment(device)
    _say("fastlora doctor\n" + "\n".join(f"  {k}: {v}" for k, v in info.items()), as_json)
    if device == "cpu":
        triton = "checked under Triton's interpreter (TRITON_INTERPRET=1, slow)" if info["triton_interpret"] else (
            "not checked: it runs on GPUs; set TRITON_INTERPRET=1 to check it under Triton's interpreter")
        _say(f"  on the CPU: the torch backend is checked; triton is {triton}", as_json)
    _say(f"checks (each backend in a child process, {timeout:g} s each; against the float64 reference):", as_json)
    verdicts = {}
    for backend in backends:
        result = run_child("fastlora.doctor.checks", [backend, device], timeout, _progress(backend, as_json))
        verdicts[backend] = {**verdict_of(result, timeout), "seconds": round(result.seconds, 1)}
    _say("verdicts:", as_json)
    for backend, v in verdicts.items():
        _say(f"  {backend}: {v['verdict']}" + (f": {v['detail']}" if v["verdict"] != "pass" else f" ({v['detail']})"), as_json)
    table = None
    if timing and device == "cuda":
        passing = [b for b in ("torch", "triton", "cuda") if verdicts.get(b, {}).get("verdict") == "pass"]
        table = _time_table(passing, timeout, as_json)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stored = store_verdicts(torch.device(device), verdicts, date)
    _say(f"verdicts stored in {stored}" if not isinstance(stored, str) else f"verdicts not stored: {stored}", as_json)
    status = int(any(v["verdict"] == "fail" for v in verdicts.values()))
    if as_json:
        report = {"environment": info, "backends": verdicts, "time_table": table, "date": date, "exit_status": status}
        print(json.dumps(report, indent=1))
    return status
