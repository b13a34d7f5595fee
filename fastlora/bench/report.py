"""Reports of a run: the markdown table (stdout), JSON, CSV and a plot of the ratios to ``base``.

Every time is the median milliseconds per call; "IQR" is ± half the interquartile range of the
calls, as a percentage of the median: the noise the median sits in. "× base" is that time divided
by ``base``'s (the frozen linear layer alone) in the same case, so 1.25 means the LoRA layer costs
25 % more than the layer it adapts. "peak MiB" is the memory a training step allocates above what was allocated
before it (GPU only). "max rel err" is the largest ‖result − float64 reference‖ / ‖reference‖ over
the output and the gradients checked.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
from dataclasses import asdict
from itertools import groupby

import torch

from .. import __version__
from ..ops.auto import auto_summary
from ..ops.registry import available_backends
from .cases import MODES
from .providers import not_timed_reason
from .runner import Result

COLUMNS = ("mode", "M", "K", "N", "shape", "r", "dtype", "device", "provider", "status", "ms", "q1_ms", "q3_ms", "ratio_to_base",
           "tflops", "peak_extra_mib", "mem_ratio_to_base", "max_rel_error", "note")


def machine_info(device: str) -> dict:
    """The device's name, library versions, backends and the UTC date: what a result depends on."""
    if device == "cpu":
        name = _cpu_model()
        # a shared machine's load skews CPU times: say how busy it was when the run ended
        load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        threads = torch.get_num_threads()
        detail = f"{os.cpu_count()} cores, torch on {threads} thread{'s' if threads > 1 else ''}{load}"
    else:
        name = torch.cuda.get_device_name(device)
        detail = f"CUDA {torch.version.cuda}"
    return {
        "device": name,
        "device_detail": detail,
        "torch": torch.__version__,
        "fastlora": __version__,
        "python": platform.python_version(),
        "backends": {name: _backend_status(name, device) for name in available_backends()},
        "auto": auto_summary(torch.device(device)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _backend_status(backend: str, device: str) -> str:
    """"available", or why the backend is unavailable or not timed on ``device``."""
    status = available_backends()[backend]
    if not status.available:
        return str(status)
    not_timed = not_timed_reason(backend, device)
    return f"available, not timed on {device}: {not_timed}" if not_timed else "available"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def as_row(r: Result) -> dict:
    c = r.case
    row = {"mode": c.mode, "M": c.M, "K": c.shape.K, "N": c.shape.N, "shape": c.shape.name, "r": c.r,
           "dtype": c.dtype, "device": c.device}
    row.update({k: v for k, v in asdict(r).items() if k != "case"})
    return row


def _replace(path: str, write) -> None:
    """``write(file)`` into a temporary beside ``path``, then rename it over ``path``: a run killed
    mid-write (a timeout) leaves the previous complete file, never a truncated one."""
    temporary = f"{path}.{os.getpid()}.partial"
    with open(temporary, "w", newline="") as f:
        write(f)
    os.replace(temporary, path)


def write_json(path: str, results: list[Result], info: dict) -> None:
    _replace(path, lambda f: json.dump({"machine": info, "results": [as_row(r) for r in results]}, f, indent=1))


def write_csv(path: str, results: list[Result]) -> None:
    def write(f):
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(as_row(r) for r in results)

    _replace(path, write)


def write_reports(results: list[Result], info: dict, *, json_path=None, csv_path=None, markdown_path=None) -> str:
    """Write every report asked for from ``results`` so far and return the markdown. Called after
    each case as well as at the end, so that a run stopped by a timeout keeps the cases it finished
    (``info["complete"]`` says whether the run ended)."""
    report = render_markdown(results, info)
    if markdown_path:
        _replace(markdown_path, lambda f: f.write(report))
    if json_path:
        write_json(json_path, results, info)
    if csv_path:
        write_csv(csv_path, results)
    return report


def _fmt(value: float | None, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: list[Result]) -> str:
    """One markdown table per mode; a case's columns are written on its first provider's row."""
    sections = []
    for mode, mode_results in groupby(results, key=lambda r: r.case.mode):
        rows = []
        for case, case_results in groupby(mode_results, key=lambda r: r.case):
            for i, r in enumerate(case_results):
                case_cols = [str(case.M), f"{case.shape.K}→{case.shape.N}", str(case.r), case.dtype] if i == 0 else [""] * 4
                rows.append(case_cols + [r.provider] + _measure_columns(r, mode))
        header = ["M", "K→N", "r", "dtype", "provider", "median ms", "IQR", "× base", "TFLOP/s"]
        if mode == "train":
            header += ["peak MiB", "mem × base"]
        header += ["max rel err"]
        sections.append(f"### {mode}\n\n" + _markdown(header, rows))
    return "\n\n".join(sections)


def _measure_columns(r: Result, mode: str) -> list[str]:
    n_memory = 2 if mode == "train" else 0
    if r.status != "ok":
        return [f"**{r.status}**" if r.status != "skipped" else "skipped", r.note] + [""] * (3 + n_memory)
    memory = [_fmt(r.peak_extra_mib, ".0f", "n/a"), _fmt(r.mem_ratio_to_base, ".2f", "n/a")][:n_memory]
    spread = f"±{50 * (r.q3_ms - r.q1_ms) / r.ms:.0f} %"
    return [f"{r.ms:.3f}", spread, _fmt(r.ratio_to_base, ".2f"), f"{r.tflops:.2f}"] + memory + [f"{r.max_rel_error:.1e}"]


def geomean_ratios(results: list[Result], against: str) -> dict[tuple[str, str], tuple[float, int]]:
    """(provider, mode) → (geometric mean over cases of ms / ms of ``against``, number of cases),
    over the cases where both ran and passed their check."""
    logs: dict[tuple[str, str], list[float]] = {}
    for case, case_results in groupby(results, key=lambda r: r.case):
        ok = {r.provider: r.ms for r in case_results if r.status == "ok"}
        if against in ok:
            for provider, ms in ok.items():
                logs.setdefault((provider, case.mode), []).append(math.log(ms / ok[against]))
    return {key: (math.exp(sum(v) / len(v)), len(v)) for key, v in logs.items()}


def summary_table(results: list[Result], against: str) -> str:
    """Providers × modes: geometric-mean time ratio to ``against`` (lower is faster). A provider
    that was wrong or failed in any case of a mode gets no mean for that mode: the count instead."""
    ratios = geomean_ratios(results, against)
    failures: dict[tuple[str, str], int] = {}
    for r in results:
        if r.status in ("WRONG", "FAILED"):
            failures[r.provider, r.case.mode] = failures.get((r.provider, r.case.mode), 0) + 1
    modes = [m for m in MODES if any(r.case.mode == m for r in results)]

    def cell(provider: str, mode: str) -> str:
        if (provider, mode) in failures:
            return f"**WRONG or FAILED** in {failures[provider, mode]} case(s)"
        return _fmt(ratios.get((provider, mode), (None,))[0], ".2f", "–")

    reported = {p for p, _ in ratios} | {p for p, _ in failures}
    providers = [p for p in dict.fromkeys(r.provider for r in results) if p in reported]
    rows = [[p] + [cell(p, m) for m in modes] for p in providers]
    return _markdown(["provider"] + [f"{m} (× {against})" for m in modes], rows)


def render_markdown(results: list[Result], info: dict) -> str:
    backends = "; ".join(f"{k}: {v}" for k, v in info["backends"].items())
    return "\n\n".join([
        f"## fastlora bench — {info['device']} ({info['device_detail']})",
        f"torch {info['torch']}, fastlora {info['fastlora']}, python {info['python']}, {info['date']}.  \n"
        f"Backends: {backends}.  \n"
        f"backend='auto' (fastlora-auto): {info.get('auto', 'not recorded')}.  \n"
        f"Command: `{info.get('command', 'fastlora bench')}`"
        + (f"  \n**Partial run** (written as each case finished): complete {info['complete']}" if info.get("complete", "yes") != "yes" else ""),
        "Ratios: a provider's median time divided by that of `base` (or `naive`) in the same case; the "
        "summaries give their geometric mean over the cases of each mode. Lower is faster.",
        "### summary: time ÷ base (the frozen linear layer alone)\n\n" + summary_table(results, "base"),
        "### summary: time ÷ naive (the unfused LoRA composition)\n\n" + summary_table(results, "naive"),
        results_table(results),
    ]) + "\n"
