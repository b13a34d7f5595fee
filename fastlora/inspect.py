"""``fastlora inspect``: the compiled GPU code of every kernel, on a machine with or without a GPU.

Triton kernels: every op module in ``fastlora/ops/`` that defines ``launch_for_inspection(M, K, N, r,
dtype, adapter_dtype, dropout, backward)`` is run on CPU tensors for each problem, with Triton's launch
entry points (``Autotuner.run``, ``JITFunction.run``) replaced by recorders and ``device_limits``
standing in the target GPU (``target_limits``), so grids and budgets are those of the target. For an
autotuned launch the autotuner's own pruning says which configs can be picked; each kernel ×
specialisation × config × arch is then compiled once (``ops/_triton_compile.py``, which specialises
as the JIT does) and read with Triton's ``cuobjdump``: registers, stack (spills), shared memory and the
SASS instructions that decide speed. Configs the pruner compiled and dropped are listed as not
pickable. One worker process per arch.

``fastlora._C``: ``cuobjdump`` over the built library, every kernel of every arch it carries.

What this cannot tell: time, how the memory system behaves, anything that happens after launch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import itertools
import json
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

# Arch names accepted by --arch → compute capability (90a: Triton compiles capability 9.0 for sm_90a).
ARCHS = {"90a": (9, 0), "80": (8, 0)}
_ARCH_ALIASES = {"90": "90a", "sm_90a": "90a", "sm_90": "90a", "sm90a": "90a", "sm_80": "80", "sm80": "80"}
DTYPES = {  # name → (dtype of x and W, dtype of the adapters)
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16+fp32": (torch.bfloat16, torch.float32),  # PEFT's default: fp32 adapters on a bf16 base
    "fp16": (torch.float16, torch.float16),
    "fp16+fp32": (torch.float16, torch.float32),
    "fp32": (torch.float32, torch.float32),
}
# Llama-3-8B's anchor projections (q/o, gate/up, down), decode-sized and training-sized M.
DEFAULT_SHAPES = "4096x4096,4096x14336,14336x4096"
DEFAULT_TOKENS = (64, 8192)
DEFAULT_RANKS = (16, 64)
DEFAULT_DTYPES = ("bf16", "bf16+fp32")
DEFAULT_DROPOUTS = (0.0, 0.1)
SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS", "LDSM", "STL", "LDL")
_BUILD_HINT = "build it with `bash .ci/build_cuda.sh` (CUDA toolkit, no GPU needed)"


class Problem(NamedTuple):
    M: int
    K: int
    N: int
    r: int
    dtype: str
    dropout: float

    @property
    def label(self) -> str:
        return f"M{self.M} K{self.K} N{self.N} r{self.r} {self.dtype} p{self.dropout:g}"


@dataclasses.dataclass
class Row:
    """One kernel × arch × config (× specialisation for Triton), as compiled."""

    source: str  # the op module (fastlora.ops.triton_lora) or fastlora._C
    kernel: str
    arch: str
    config: str
    specialisation: dict
    pickable: bool
    via: list = dataclasses.field(default_factory=list)
    registers: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    sass: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    problems: list = dataclasses.field(default_factory=list)
    cubin: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def spills(self) -> bool:
        return bool(self.stack_bytes) or bool(self.sass.get("STL")) or bool(self.sass.get("LDL"))


# ---------------------------------------------------------------- parsing the command line


def parse_archs(text: str) -> tuple[list[str], list[str]]:
    """(arch names, one message per item that is not one) from ``"90a,80"``."""
    archs, errors = [], []
    for item in filter(None, (i.strip().lower() for i in text.split(","))):
        name = _ARCH_ALIASES.get(item, item)
        if name in ARCHS:
            archs.append(name)
        else:
            errors.append(f"--arch: cannot target {item!r}; inspect compiles for {', '.join(ARCHS)}")
    return list(dict.fromkeys(archs)), errors


def parse_ints(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of positive integers")
    return values


def parse_floats(option: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0 <= v < 1 for v in values):
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of probabilities in [0, 1)")
    return values


def parse_dtypes(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in DTYPES]
    if unknown or not names:
        raise ValueError(f"--dtypes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(DTYPES)}")
    return names


def make_problems(shapes: str, tokens, ranks, dtypes, dropouts) -> list[Problem]:
    """Every combination; a shape ``MxKxN`` fixes its own M. Raises ValueError naming a bad shape."""
    from .bench.cases import parse_shapes

    try:
        parsed = parse_shapes(shapes)
    except ValueError as err:
        raise ValueError(f"--shapes: {err}") from None
    problems = []
    for shape, r, dtype, p in itertools.product(parsed, ranks, dtypes, dropouts):
        for M in (shape.tokens,) if shape.tokens else tokens:
            problems.append(Problem(M, shape.K, shape.N, r, dtype, p))
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------- recording the launches


class Launch(NamedTuple):
    """One ``kernel[grid](*args, **kwargs)`` the op made; ``config`` is the autotuner's (None for a
    plain launch), ``pickable`` whether its pruning keeps it, ``via`` the function that
    ``launch_for_inspection`` called to make it (``triton_forward``, say)."""

    kernel: object
    args: tuple
    kwargs: dict
    config: object
    pickable: bool
    via: str


@contextlib.contextmanager
def intercepted_launches(launches: list):
    """Within the block, Triton launches are appended to ``launches`` instead of run. An autotuned
    launch becomes one launch per config of the autotuner, flagged by its own pruning."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    current = [None, True]  # the config being expanded, and whether it can be picked

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, current[0], current[1], _entry_point()))

    def autotuner_run(self, *args, **kwargs):
        # As Autotuner.run: pruning reads the positional arguments from self.nargs; one config is not pruned.
        self.nargs = dict(zip(self.arg_names, args))
        try:
            pickable = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        finally:
            self.nargs = None
        for config in self.configs:
            current[:] = config, config in pickable
            try:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                current[:] = None, True

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def _entry_point() -> str:
    """The name of the function that ``launch_for_inspection`` called on the way to this launch."""
    frame, below = sys._getframe(1), "launch_for_inspection"
    while frame is not None and frame.f_code.co_name != "launch_for_inspection":
        below, frame = frame.f_code.co_name, frame.f_back
    return below


def op_modules() -> tuple[list, list[str]]:
    """([(name, module)] of the op modules that define ``launch_for_inspection``, [import errors])."""
    from . import ops

    found, errors = [], []
    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.startswith("_"):
            continue
        name = f"{ops.__name__}.{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception as err:  # an op module that does not import is reported, the others still run
            errors.append(f"{name}: import failed ({type(err).__name__}: {err})")
            continue
        if hasattr(module, "launch_for_inspection"):
            found.append((name, module))
    return found, errors


# ---------------------------------------------------------------- compiling and reading the code


def count_sass(sass: str) -> dict:
    """How many of each of ``SASS_OPS`` a ``cuobjdump -sass`` listing holds (predicated ones too)."""
    opcodes = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.MULTILINE)
    return {op: sum(1 for o in opcodes if o == op) for op in SASS_OPS}


def _cubin_sass(cubin: bytes) -> dict:
    import tempfile

    from .ops._triton_compile import cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return count_sass(cuobjdump(f.name, "-sass"))


def _config_label(launch: Launch, spec) -> str:
    opts = spec.options
    if launch.config is None:
        return f"warps={opts.num_warps} stages={opts.num_stages}"
    blocks = " ".join(f"{k}={v}" for k, v in launch.config.kwargs.items())
    return f"{blocks} warps={opts.num_warps} stages={opts.num_stages}"


def _specialisation(launch: Launch, spec) -> dict:
    """Constexprs that are not the config's, and the pointer arguments' types, by parameter name."""
    names = launch.kernel.arg_names
    config_keys = set(launch.config.kwargs) if launch.config is not None else set()
    out = {names[path[0]]: value for path, value in spec.constexprs.items() if len(path) == 1}
    out = {k: v for k, v in out.items() if k not in config_keys}
    out.update({k: v for k, v in spec.signature.items() if isinstance(v, str) and v.startswith("*")})
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in out.items()}


def inspect_arch(arch: str, problems: list[Problem], position: int = 0) -> tuple[list[Row], list[str]]:
    """(rows, error messages) of every Triton kernel launched by ``problems``, compiled for ``arch``."""
    from tqdm import tqdm

    from .ops._device import KNOWN_LIMITS, target_limits
    from .ops._triton_compile import compile_for, compiled_already, specialise, target_of

    limits = KNOWN_LIMITS[ARCHS[arch]]
    target = target_of(limits.capability)
    modules, errors = op_modules()
    if not modules:
        errors.append("no op module in fastlora/ops defines launch_for_inspection")
    rows: dict[tuple, Row] = {}
    bar = tqdm(problems, desc=f"inspect sm_{arch}", unit="problem", file=sys.stderr, position=position, leave=False)
    with target_limits(limits):
        for problem in bar:
            dtype, adapter_dtype = DTYPES[problem.dtype]
            for name, module in modules:
                launches = []
                try:
                    with intercepted_launches(launches):
                        module.launch_for_inspection(
                            problem.M, problem.K, problem.N, problem.r, dtype, adapter_dtype, problem.dropout, True
                        )
                except Exception as err:  # one bad op or problem is reported; the rest still runs
                    errors.append(f"{name} on {problem.label} (sm_{arch}): {type(err).__name__}: {err}")
                for launch in launches:
                    spec = specialise(launch.kernel, target, launch.args, launch.kwargs)
                    compiled = (compile_for if launch.pickable else compiled_already)(launch.kernel, target, spec)
                    if compiled is None:  # a config the pruner dropped without compiling it
                        continue
                    key = (name, compiled.name, spec.key())
                    if key not in rows:
                        rows[key] = Row(name, compiled.name, arch, _config_label(launch, spec),
                                        _specialisation(launch, spec), False, error=compiled.error,
                                        cubin=compiled.cubin)  # fmt: skip
                        if compiled.resources is not None:
                            rows[key].registers, rows[key].stack_bytes, rows[key].shared_bytes = compiled.resources
                    row = rows[key]
                    row.pickable |= launch.pickable
                    if launch.via not in row.via:
                        row.via.append(launch.via)
                    if problem.label not in row.problems:
                        row.problems.append(problem.label)
    for row in rows.values():
        if row.cubin is not None:
            row.sass = _cubin_sass(row.cubin)
    return list(rows.values()), errors


def inspect_triton(archs: list[str], problems: list[Problem], workers: int) -> tuple[list[Row], list[str]]:
    """Rows and errors of every arch, one process per arch when ``workers`` > 1."""
    if workers <= 1 or len(archs) == 1:
        results = [inspect_arch(arch, problems) for arch in archs]
    else:
        import multiprocessing

        # spawn: a fresh interpreter per worker, so nothing of this process's Triton state is shared.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(archs)), mp_context=context) as pool:
            futures = [pool.submit(inspect_arch, arch, problems, i) for i, arch in enumerate(archs)]
            results = [f.result() for f in futures]
    rows = [row for arch_rows, _ in results for row in arch_rows]
    return rows, [e for _, errors in results for e in errors]


# ---------------------------------------------------------------- fastlora._C


def _demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    plain = done.stdout.splitlines() if done.returncode == 0 else names
    # "void fastlora::(anonymous namespace)::lora_gemm_kernel<false, float>(Params<…>)" → "lora_gemm_kernel<false, float>"
    short = [re.sub(r"^void |\(.*$", "", p.replace("(anonymous namespace)::", "").replace("fastlora::", "")) for p in plain]
    return dict(zip(names, short))


def extension_library() -> str | None:
    """The path of the built ``fastlora._C``, or None (it is located, not imported)."""
    spec = importlib.util.find_spec("fastlora._C")
    return spec.origin if spec is not None and spec.origin else None


def inspect_extension(path: str) -> list[Row]:
    """One row per kernel × arch that the library at ``path`` carries as SASS."""
    from .ops._triton_compile import cuobjdump

    rows: dict[tuple[str, str], Row] = {}
    arch = None
    for line in cuobjdump(path, "-res-usage").splitlines():
        if m := re.match(r"\s*arch = sm_(\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
            reg, stack, shared, local = map(int, m.groups())
            rows[(name, arch)] = Row("fastlora._C", name, arch, config="", specialisation={}, pickable=True,
                                     registers=reg, stack_bytes=stack + local, shared_bytes=shared)  # fmt: skip
    # -sass lists each arch's code ("code for sm_80") as "Function : name" blocks.
    arch, name, chunks = None, None, {}
    for line in cuobjdump(path, "-sass").splitlines():
        if m := re.match(r"\s*code for sm_(\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1)
        elif name is not None:
            chunks.setdefault((name, arch), []).append(line)
    for key, lines in chunks.items():
        if key in rows:
            rows[key].sass = count_sass("\n".join(lines))
    plain = _demangle(sorted({name for name, _ in rows}))
    for (name, _), row in rows.items():
        row.kernel = plain[name]
    return sorted(rows.values(), key=lambda r: (r.arch, r.kernel))


# ---------------------------------------------------------------- the report


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
        rows, errors = inspect_triton(archs, problems, args.workers)
        messages += [f"error: {e}" for e in errors]
    rows.sort(key=_sort_key)

    library = extension_library()
    c_rows, c_message = [], None
    if library is None:
        c_message = f"fastlora._C not built: {_BUILD_HINT}"
    else:
        try:
            c_rows = inspect_extension(library)
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
