"""Compiling every recorded launch for a target arch and reading the code (``cuobjdump``): registers,
stack (spills), shared memory and the SASS instructions of ``SASS_OPS``; and the same read of the
built ``fastlora._C``. One worker process per arch."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

from .problems import ARCHS, DTYPES, SASS_OPS, Problem, Row
from .recording import Launch, intercepted_launches, op_modules

def count_sass(sass: str) -> dict:
    """How many of each of ``SASS_OPS`` a ``cuobjdump -sass`` listing holds (predicated ones too)."""
    opcodes = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.MULTILINE)
    return {op: sum(1 for o in opcodes if o == op) for op in SASS_OPS}


def _cubin_sass(cubin: bytes) -> dict:
    import tempfile

    from ..ops._triton_compile import cuobjdump

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

    from ..ops._device import KNOWN_LIMITS, target_limits
    from ..ops._triton_compile import compile_for, compiled_already, specialise, target_of

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
    from ..ops._triton_compile import cuobjdump

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
