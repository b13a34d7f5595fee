"""The report of ``fastlora inspect`` (markdown, JSON, cubins) and the command itself."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from . import compiling
from .problems import (ARCHS, DEFAULT_DROPOUTS, DEFAULT_DTYPES, DEFAULT_RANKS, DEFAULT_SHAPES, DEFAULT_TOKENS, DTYPES,
                       SASS_OPS, _BUILD_HINT, Row, make_problems, parse_archs, parse_dtypes, parse_floats, parse_ints)  # fmt: skip

def _varying(rows: list[Row]) -> dict[str, list[str]]:
    """Per kernel and op that launched it, the specialisation keys whose values differ between its rows
    (the others say nothing)."""
    by_kernel: dict[tuple, list[Row]] = {}
    for row in rows:
        by_kernel.setdefault((row.kernel, tuple(row.via)), []).append(row)
    varying = {}
    for kernel, krows in by_kernel.items():
        keys = dict.fromkeys(k for r in krows for k in r.specialisation)
        varying[kernel] = [k for k in keys if len({repr(r.specialisation.get(k, "-")) for r in krows}) > 1]
    return varying


def _spec_label(row: Row, varying: dict) -> str:
    return " ".join(f"{k}={row.specialisation.get(k, '-')}" for k in varying.get((row.kernel, tuple(row.via)), []))


def _note(row: Row) -> str:
    if row.error:
        return "COMPILE ERROR: " + row.error.splitlines()[0][:120]
    if row.spills:
        return "SPILLS" if row.pickable else "spills (dropped by the pruner)"
    return ""


def _table(rows: list[Row], varying: dict, with_spec: bool) -> str:
    header = ["kernel", "arch", "config", *(["via", "specialisation"] if with_spec else []), "pickable", "regs",
              "stack B", "shared KiB", *SASS_OPS, "note"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        shared = f"{r.shared_bytes / 1024:.1f}" if r.shared_bytes is not None else ""
        cells = [r.kernel, f"sm_{r.arch}", r.config, *([", ".join(r.via), _spec_label(r, varying)] if with_spec else []),
                 "yes" if r.pickable else "no", str(r.registers or ""), "" if r.stack_bytes is None else str(r.stack_bytes),
                 shared, *(str(r.sass.get(op, "")) for op in SASS_OPS), _note(r)]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(triton_rows, triton_messages, c_rows, c_message, header: dict) -> str:
    import triton

    varying = _varying(triton_rows)
    out = [
        "# fastlora inspect: the compiled kernels",
        "",
        f"`{header['command']}` (triton {triton.__version__}, torch {torch.__version__}).",
        "regs: registers a thread; stack B: stack + local memory a thread (spills); shared: dynamic + static a "
        "program. HGMMA = wgmma, HMMA = mma.sync, UTMALDG/UTMASTG = TMA load/store, LDGSTS = cp.async, "
        "LDSM = ldmatrix, STL/LDL = local-memory (spill) stores/loads. pickable: the autotuner's pruning "
        "keeps the config for at least one problem. Problems: " + header["problems"] + ".",
        "",
        "## Triton kernels",
        "",
    ]
    out += [f"- {m}" for m in triton_messages]
    if triton_rows:
        pickable = [r for r in triton_rows if r.pickable]
        bad = [r for r in pickable if r.spills or r.error]
        out += [
            f"{len(triton_rows)} compiles ({len(pickable)} pickable): {sum(bool(r.error) for r in triton_rows)} "
            f"compile errors, {len(bad)} pickable with local memory or errors.",
            "",
            _table(triton_rows, varying, with_spec=True),
        ]
    out += ["", "## fastlora._C (CUDA extension)", ""]
    out += [f"- {c_message}"] if c_message else [_table(c_rows, {}, with_spec=False)]
    return "\n".join(out) + "\n"


def _as_json(row: Row) -> dict:
    data = dataclasses.asdict(row)
    data.pop("cubin")
    return {**data, "spills": row.spills}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def write_cubins(directory: str, rows: list[Row], varying: dict) -> None:
    """One file per kernel × arch × config × specialisation, named after them and the op that launched it."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.cubin is None:
            continue
        short = {"BLOCK_M": "m", "BLOCK_N": "n", "BLOCK_K": "k", "GROUP_M": "g", "warps": "w", "stages": "s"}
        config = re.sub(r"(\w+)=", lambda m: short.get(m.group(1), m.group(1)), row.config)
        name = _slug(f"{row.kernel}.sm_{row.arch}.{'+'.join(row.via)}.{config}.{_spec_label(row, varying)}")[:200]
        Path(directory, f"{name}.cubin").write_bytes(row.cubin)


def _sort_key(row: Row):
    def natural(text: str) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]

    spec = sorted(map(repr, row.specialisation.items()))
    return (row.source, row.kernel, row.arch != "90a", row.arch, row.via, spec, natural(row.config))


# ---------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="90a,80", help=f"targets, of {', '.join(ARCHS)} (default: 90a,80)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"KxN, MxKxN or bench presets (default: {DEFAULT_SHAPES})")
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="M values (default: 64,8192)")
    parser.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), help="LoRA ranks (default: 16,64)")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                        help=f"of {', '.join(DTYPES)}; X+fp32 = fp32 adapters on an X base (default: bf16,bf16+fp32)")
    parser.add_argument("--dropout", default=",".join(map(str, DEFAULT_DROPOUTS)), help="LoRA dropout p (default: 0,0.1)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one arch each (default: 2)")
    parser.add_argument("--json", metavar="FILE", help="write every row as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the report printed on stdout to a file too")
    parser.add_argument("--cubin-dir", metavar="DIR", help="write each cubin there, named kernel.arch.op.config.specialisation")


def run(args, argv: list[str]) -> int:
    """The report on stdout; 0 if every kernel compiled and no pickable config spills, 1 if not, 2 on
    bad input (whatever could still be inspected is reported)."""
    started = time.perf_counter()
    bad_input, messages = [], []
    archs, arch_errors = parse_archs(args.arch)
    bad_input += arch_errors
    problems = []
    try:
        problems = make_problems(
            args.shapes,
            parse_ints("--tokens", args.tokens),
            parse_ints("--ranks", args.ranks),
            parse_dtypes(args.dtypes),
            parse_floats("--dropout", args.dropout),
        )
    except ValueError as err:
        bad_input.append(str(err))
    messages += bad_input
    if os.environ.get("TRITON_INTERPRET") == "1":
        messages.append("skipped: TRITON_INTERPRET=1 is set, and interpreted kernels cannot be compiled; "
                        "run `env -u TRITON_INTERPRET python -m fastlora inspect`")  # fmt: skip
        bad_input.append("TRITON_INTERPRET")
        rows = []
    elif not archs or not problems:
        messages.append("skipped: no valid arch or problem to inspect")
        rows = []
    else:
        rows, errors = compiling.inspect_triton(archs, problems, args.workers)
        messages += [f"error: {e}" for e in errors]
    rows.sort(key=_sort_key)

    library = compiling.extension_library()
    c_rows, c_message = [], None
    if library is None:
        c_message = f"fastlora._C not built: {_BUILD_HINT}"
    else:
        try:
            c_rows = compiling.inspect_extension(library)
            if not c_rows:
                c_message = f"fastlora._C ({library}) holds no SASS that cuobjdump can read"
        except Exception as err:
            c_message = f"fastlora._C ({library}): {err}"

    problem_text = (f"{len(problems)} (shapes {args.shapes}; M {args.tokens}; r {args.ranks}; {args.dtypes}; "
                    f"dropout {args.dropout}; forward and backward)")  # fmt: skip
    header = {"command": shlex.join(["fastlora", "inspect", *argv]), "problems": problem_text}
    report = render_markdown(rows, messages, c_rows, c_message, header)
    print(report, end="")
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.cubin_dir:
        write_cubins(args.cubin_dir, rows, _varying(rows))
    wall = time.perf_counter() - started
    if args.json:
        import triton

        data = {**header, "triton": triton.__version__, "archs": archs, "problems": [p._asdict() for p in problems],
                "messages": messages, "rows": [_as_json(r) for r in rows], "extension": [_as_json(r) for r in c_rows],
                "extension_message": c_message, "wall_s": round(wall, 1)}  # fmt: skip
        Path(args.json).write_text(json.dumps(data, indent=1))
    failed = any(r.error for r in rows) or any(r.pickable and r.spills for r in rows + c_rows)
    failed = failed or any(m.startswith("error:") for m in messages)
    print(f"fastlora inspect: {len(rows)} Triton compiles in {wall:.0f} s", file=sys.stderr)
    return 2 if bad_input else int(failed)
