"""The census's report (markdown, JSON), its baseline (counts only) and the check against it, and the
``fastlora census`` command."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .measure import COUNTS, row_key, run_census
from .subjects import ARCHS, default_problems

# The committed baseline the CI test compares against (a source checkout's benchmarks/results/).
BASELINE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "census-baseline.json"
REGENERATE = "python -m fastlora census --write-baseline"
# Python calls are gated only where these match the baseline's: another torch, triton or peft runs
# other Python, which is not a regression of fastlora's.
_PYTHON_GATED_BY = ("python", "torch", "triton", "peft")


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "peft", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def machine() -> dict:
    """Where and when: host, CPU, cores, the load (``uptime``), the commit, UTC date."""
    cpu = platform.processor()
    with _suppress():
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    uptime = ""
    with _suppress():
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    commit = ""
    with _suppress():
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = done.stdout.strip()
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "uptime": uptime, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "affinity": sorted(os.sched_getaffinity(0))}  # fmt: skip


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


# ---------------------------------------------------------------- baseline


def baseline_of(rows: list[dict], info: dict) -> dict:
    """What the baseline keeps: the versions, and each measured row's counts by ``row_key``."""
    counts = {row_key(r): {k: r[k] for k in COUNTS} for r in rows if "note" not in r}
    return {"versions": info["versions"], "regenerate": REGENERATE, "counts": counts}


def compare(baseline: dict, rows: list[dict], current_versions: dict) -> list[str]:
    """One message per count that rose above the baseline's, or per baseline row not measured now;
    empty when nothing rose. Python calls are compared only under the baseline's versions."""
    gate_python = all(baseline.get("versions", {}).get(k) == current_versions.get(k) for k in _PYTHON_GATED_BY)
    now = {row_key(r): r for r in rows}
    problems = []
    for key, counts in baseline["counts"].items():
        row = now.get(key)
        if row is None or "note" in row:
            why = "not in this census" if row is None else f"not measurable now ({row['note']})"
            problems.append(f"{key}: {why}")
            continue
        for name, was in counts.items():
            if name == "python_calls" and not gate_python:
                continue
            if row[name] > was:
                problems.append(f"{key}: {name} rose from {was} to {row[name]}")
    return problems


def failure_message(problems: list[str], path) -> str:
    return (f"the launch census rose above its baseline ({path}):\n  " + "\n  ".join(problems)
            + f"\nIf the rise is intended, regenerate the baseline with `{REGENERATE}` and commit it.")  # fmt: skip


# ---------------------------------------------------------------- markdown


def _counts_table(rows: list[dict]) -> list[str]:
    header = ["subject", "op", "problem", "GPU kernels", "launches", "memsets", "allocs", "other ATen", "0-d ops", "views",
              "Python calls", "Triton kernels / note"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "note" in r:
            cells = [r["subject"], r["op"], r["problem"], *["–"] * 8, r["note"]]
        else:
            cells = [r["subject"], r["op"], r["problem"], str(gpu_kernels(r)), *(str(r[k]) for k in COUNTS),
                     ", ".join(r["kernels"])]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _host_table(host: dict) -> list[str]:
    rows = host["rows"]
    floor = rows.get("F.linear", {})
    ops = ("forward", "step", "decode")
    header = ["subject", *(f"{op} µs" for op in ops), *(f"{op} over F.linear" for op in ops)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, times in rows.items():
        if "error" in times:
            lines.append(f"| {name} | {times['error']} |" + " |" * (len(header) - 2))
            continue
        over = [f"{times[op] - floor[op]:+.1f}" if op in floor else "" for op in ops]
        lines.append("| " + " | ".join([name, *(f"{times[op]:.1f}" for op in ops), *over]) + " |")
    return lines


def gpu_kernels(row: dict) -> int:
    """What a call would put on a GPU's stream: Triton launches, memsets and other (non-view) ATen ops."""
    return row["launches"] + row["memsets"] + row["compute"]


def _targets(data: dict) -> list[str]:
    """Issue 20's targets, each with what this census measured (the triton rows)."""
    triton = [r for r in data["rows"] if r["subject"] == "triton" and "note" not in r]

    def worst(op, count, dense=None):
        rows = [r for r in triton if r["op"] == op and (dense is None or (int(r["problem"].split()[0][1:]) > 64) == dense)]
        return max((gpu_kernels(r) if count == "kernels" else r[count] for r in rows), default=None)

    checks = [
        ("dense forward (M > 64): 1 GPU kernel", worst("forward", "kernels", True), 1),
        ("dense forward (M > 64): no memset", worst("forward", "memsets", True), 0),
        ("backward: at most 3 GPU kernels", worst("backward", "kernels"), 3),
        ("decode: at most 2 GPU kernels", worst("decode", "kernels"), 2),
    ]
    lines = ["| target (triton rows, worst problem) | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {got} | {'yes' if got is not None and got <= most else 'no'} |" for name, got, most in checks]
    host = (data.get("host") or {}).get("rows", {})
    timed = [("patched PEFT forward <= PEFT's forward", "peft+patch(auto)", "forward", "peft", 0.0),
             ("auto after its decision <= named backend + 2 us (forward)", "lora_linear(auto->triton)", "forward",
              "lora_linear(triton)", 2.0),
             ("fused training step <= nn.Linear's + 40 us (triton)", "lora_linear(triton)", "step", "nn.Linear", 40.0),
             ("fused training step <= nn.Linear's + 40 us (torch)", "FusedLoRALinear(torch)", "step", "nn.Linear", 40.0)]  # fmt: skip
    for name, subject, op, reference, slack in timed:
        if op in host.get(subject, {}) and op in host.get(reference, {}):
            over = host[subject][op] - host[reference][op]
            lines.append(f"| {name} | {over:+.1f} us | {'yes' if over <= slack else 'no'} (host table, noisy) |")
    return lines


def render_markdown(data: dict) -> str:
    info, v = data["info"], data["info"]["versions"]
    out = [
        "# fastlora census: what each call costs outside the kernels",
        "",
        f"`{info['command']}` on {info['host']} ({info['cpu']}, {info['cores']} cores, affinity "
        f"{info['affinity']}), {info['date']}, commit {info['commit']}; python {v['python']}, torch {v['torch']}, "
        f"triton {v['triton']}, peft {v['peft']}. Load before: `{info['uptime']}`; after: "
        f"`{info.get('uptime_after', '?')}`.",
        "",
        "## Launch census (counts per call, CPU, launches stubbed)",
        "",
        "Each call runs on CPU tensors of the full problem with the target GPU's limits standing in "
        f"({', '.join('sm_' + a for a in data['archs'])}); no kernel runs and no ATen op computes (outputs are "
        "uninitialised tensors of the right shapes). launches: Triton kernel launches (an autotuned launch "
        "is one, its config cached; after a call's warm-up every launch goes through its pre-bound plan, "
        "`fastlora/ops/_prebound.py`, to a stand-in of the compiled kernel's C launcher). memsets: zeros/fill_/zero_-style ATen "
        "ops; allocs: empty*; other ATen: every other op that is a kernel on a GPU (copies, casts, GEMMs, "
        "sums); 0-d ops: ATen ops on 0-d tensors only (the dropout seed, drawn on the CPU on a GPU run too); "
        "GPU kernels: launches + memsets + other ATen, what the call puts on a GPU's stream "
        "(allocations from the caching allocator launch nothing); views: metadata only. Python calls: Python function calls of the call (one is the census's "
        "own closure), the counters' frames left out. backward: autograd.grad of the forward's output for "
        "x, lora_A, lora_B. decode: no grad, eval mode. auto on CPU tensors decides torch (the same cached "
        "look-up as after a GPU decision); auto->triton is auto after it decided triton. cuda: its host code "
        "is C++ in fastlora._C, which needs a GPU here, so it is not measurable on this machine.",
        "",
        *_targets(data),
        "",
        *_counts_table(data["rows"]),
    ]
    if data.get("host"):
        host = data["host"]
        out += [
            "",
            f"## Host µs per call ({host['problem']}, torch threads {host['threads']}, min of "
            f"{host['reps']}×{host['rounds']} calls)",
            "",
            "Tiny real tensors, so the time is the Python and dispatch path. Triton launches go through "
            "fastlora's pre-bound plans (the signature and the plan's call included) to a stand-in of the "
            "compiled kernel's C launcher (the driver's launch itself not included). step: forward + "
            "backward. Read the figures beside the load above: on a loaded machine a few µs are noise.",
            "",
            *_host_table(host),
        ]
        binder = host.get("triton_binder")
        if binder:
            out += ["", f"What Triton's own launch path would add to each launch of the triton rows, and the plans skip "
                    f"after a signature's first call: its binder (JITFunction.run's specialisation of the "
                    f"{binder['arguments']} arguments of one {binder['kernel']} launch, timed on the CPU for sm_90a), "
                    f"{binder['us']:.1f} µs, and the autotuner's key and cache look-up on top."]  # fmt: skip
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="90a", help=f"GPU limits standing in, of {', '.join(ARCHS)} (default: 90a)")
    parser.add_argument("--json", metavar="FILE", help="write every row (and the host times) as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the report printed on stdout to a file too")
    parser.add_argument("--no-timing", action="store_true",
                        help="counts only: skip the host µs table (implied by --check and --write-baseline)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing (default: 1)")
    parser.add_argument("--reps", type=int, default=300, help="timed calls per round (default: 300)")
    parser.add_argument("--baseline", metavar="FILE", default=str(BASELINE), help=f"default: {BASELINE}")
    parser.add_argument("--check", action="store_true", help="exit 1 if a count rose above the baseline's")
    parser.add_argument("--write-baseline", action="store_true", help="write the counts as the new baseline")


def run(args, argv: list[str]) -> int:
    """0, or 1 when ``--check`` finds a count above the baseline, 2 on bad input."""
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        print(f"--arch: cannot target {', '.join(bad) or '(none)'}; choose from {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fastlora census: TRITON_INTERPRET=1 is set, which changes the triton launch path (interpreter "
              "configs, one program); run `env -u TRITON_INTERPRET python -m fastlora census`", file=sys.stderr)  # fmt: skip
        return 2
    import torch

    started = time.perf_counter()
    info = {**machine(), "versions": versions(), "command": "python -m fastlora census " + shlex.join(argv)}
    rows = run_census(default_problems(), archs=archs)
    data = {"info": info, "archs": archs, "rows": rows, "host": None}
    if not (args.no_timing or args.write_baseline or args.check):  # the gate and its baseline are counts only
        from .host import host_table

        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)  # threads that wait on a loaded machine's cores are noise
        try:
            data["host"] = {**host_table(reps=args.reps), "threads": args.threads}
        finally:
            torch.set_num_threads(threads)
    with _suppress():
        info["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    report = render_markdown(data)
    print(report, end="")
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    code = 0
    if args.write_baseline:
        Path(args.baseline).write_text(json.dumps(baseline_of(rows, info), indent=1, sort_keys=True) + "\n")
        print(f"fastlora census: baseline written to {args.baseline}", file=sys.stderr)
    elif args.check:
        if not Path(args.baseline).exists():
            print(f"fastlora census: no baseline at {args.baseline}; write one with `{REGENERATE}`", file=sys.stderr)
            return 2
        problems = compare(json.loads(Path(args.baseline).read_text()), rows, info["versions"])
        if problems:
            print(failure_message(problems, args.baseline), file=sys.stderr)
            code = 1
    print(f"fastlora census: {len(rows)} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return code
