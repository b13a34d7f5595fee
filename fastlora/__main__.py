"""``python -m fastlora`` / ``fastlora``: ``demo`` (check and time the fused layer), ``bench``
(every provider, every case, checked then timed), ``inspect`` (the compiled GPU code of every
kernel, no GPU needed), ``census`` (launches, memsets, ATen ops and Python calls per call, and host
µs, on the CPU) and ``doctor`` (every backend checked on this machine, each in a child process, with
a verdict line per backend). ``fastlora bench --help`` lists the options."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys

import torch

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _csv(convert):
    def parse(text: str) -> tuple:
        try:
            return tuple(convert(item.strip()) for item in text.split(",") if item.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def _parser() -> argparse.ArgumentParser:
    from .bench.cases import DTYPES, MODES, SHAPE_PRESETS

    parser = argparse.ArgumentParser(prog="fastlora", description="fastlora: a fused LoRA linear layer for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="check FusedLoRALinear against the float64 reference and time it against the naive composition")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=DEFAULT_DEVICE, help=f"default: {DEFAULT_DEVICE}")
    demo.add_argument("--repeats", type=int, default=5, help="timing repeats whose spread is shown (default: 5)")

    bench = commands.add_parser(
        "bench",
        help="benchmark the LoRA providers side by side",
        description="Check each provider against the float64 reference, then time it; every time is also given "
        "as a ratio to `base` (the frozen linear layer alone) in the same case. The --grid sets every axis; "
        "the other options override one axis each.",
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), default=DEFAULT_DEVICE, help=f"default: {DEFAULT_DEVICE}")
    bench.add_argument("--grid", choices=("smoke", "default", "full"), default="default",
                       help="the preset grid of the device (default: default)")
    bench.add_argument("--shapes", help=f"comma-separated presets ({', '.join(SHAPE_PRESETS)}), KxN or MxKxN")
    bench.add_argument("--tokens", type=_csv(int), help="M values of forward, backward and train, e.g. 1,64,1024")
    bench.add_argument("--decode-tokens", type=_csv(int), help="M values of decode (grid default: 1,16,64)")
    bench.add_argument("--ranks", type=_csv(int), help="LoRA ranks, e.g. 8,16,64,128")
    bench.add_argument("--dtypes", type=_csv(str), help=f"of {', '.join(DTYPES)}")
    bench.add_argument("--modes", type=_csv(str), help=f"of {', '.join(MODES)}")
    bench.add_argument("--providers", type=_csv(str), help="default: all; base is always run")
    bench.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's); 1 is steadier on a shared machine")
    bench.add_argument("--json", metavar="PATH", help="write every result and the machine's description as JSON")
    bench.add_argument("--csv", metavar="PATH", help="write every result as CSV")
    bench.add_argument("--markdown", metavar="PATH", help="write the report printed on stdout to a file too")
    bench.add_argument("--plot", metavar="PATH", help="draw the ratios to base as a PNG (needs matplotlib)")

    from .inspect import add_arguments

    inspect = commands.add_parser(
        "inspect",
        help="compile every kernel for sm_90a and sm_80 (or --arch 100a,120) and report registers, spills, shared memory and key SASS",
        description="Compile every Triton kernel (each config its autotuner can pick on the given problems) for "
        "the target GPUs, and read every kernel of the built fastlora._C; no GPU needed. Exit status 1 if a "
        "kernel fails to compile or a pickable config spills, 2 on bad input. TRITON_INTERPRET must not be set.",
    )
    add_arguments(inspect)

    from .census import add_arguments as add_census_arguments

    census = commands.add_parser(
        "census",
        help="count launches, memsets, allocations, ATen ops and Python calls per call on the CPU, and time the host path",
        description="For every backend, PEFT before and after patch_peft, forward/backward/decode and a few "
        "problems: Triton launches (stubbed), memsets, allocations, other ATen ops and Python calls per call, "
        "counted on CPU tensors with nothing computed; then host µs per call on tiny tensors. --check exits 1 "
        "if a count rose above the committed baseline; --write-baseline regenerates it. TRITON_INTERPRET must not be set.",
    )
    add_census_arguments(census)

    from .doctor import add_arguments as add_doctor_arguments

    doctor = commands.add_parser(
        "doctor",
        help="check every backend on this machine against the float64 reference, each in a child process",
        description="What is installed, then each backend on a handful of odd problems (forward and every "
        "gradient against the float64 reference, by the tolerance table), each backend in a child process with "
        "a timeout so that a hang or a crash is reported; on a GPU a time table at one LLM shape. One verdict "
        "line per backend. Exit status 0 when every available backend passes, 1 otherwise.",
    )
    add_doctor_arguments(doctor)
    return parser


def _grid(args, parser):
    from dataclasses import replace

    from .bench.cases import DTYPES, GRIDS, MODES

    grid = GRIDS[args.device][args.grid]
    overrides = {name: getattr(args, name) for name in ("tokens", "decode_tokens", "ranks", "dtypes", "modes")}
    grid = replace(grid, **{name: value for name, value in overrides.items() if value})
    for name, allowed in (("dtypes", DTYPES), ("modes", MODES)):
        unknown = set(getattr(grid, name)) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    return grid


def bench(argv: list[str], args, parser, registry) -> int:
    """Run the benchmark described by ``args`` (parsed from ``argv``) over the providers of
    ``registry``; 1 if any provider was wrong or failed."""
    try:
        from tqdm import tqdm
    except ImportError:
        parser.error("fastlora bench needs the bench extra: pip install tqdm (or, in the fastlora checkout: pip install -e '.[bench]')")

    from .bench.cases import make_cases, parse_shapes
    from .bench.plot import plot_ratios
    from .bench.report import machine_info, write_reports
    from .bench.runner import run

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib (or, in the fastlora checkout: pip install -e '.[bench]')")
    names = list(dict.fromkeys(("base",) + (args.providers or tuple(registry))))
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(registry)}")
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else None
    except ValueError as err:
        parser.error(f"--shapes: {err}")
    cases = make_cases(_grid(args, parser), args.device, shapes)
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = [registry[n] for n in names]

    results = []
    command = shlex.join(["fastlora", *argv])
    paths = {"json_path": args.json, "csv_path": args.csv, "markdown_path": args.markdown}
    for done, case_results in enumerate(
        tqdm(run(cases, providers), total=len(cases), desc="fastlora bench", unit="case", file=sys.stderr), 1
    ):
        results.extend(case_results)
        if done < len(cases) and any(paths.values()):
            # Each case is written as it finishes: a run stopped by a timeout keeps what it measured.
            info = {**machine_info(args.device), "command": command, "complete": f"no: {done} of {len(cases)} cases"}
            write_reports(results, info, **paths)

    info = {**machine_info(args.device), "command": command, "complete": "yes"}
    report = write_reports(results, info, **paths)
    print(report)
    if args.plot:
        plot_ratios(args.plot, results, info)
    return int(any(r.status in ("WRONG", "FAILED") for r in results))


def main(argv: list[str] | None = None, *, providers: dict | None = None) -> int:
    """The command line; ``providers`` replaces the registry of ``bench`` (tests inject their own)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "inspect":
        from .inspect import run

        return run(args, argv[1:])
    if args.command == "census":
        from .census import run as run_census

        return run_census(args, argv[1:])
    if args.command == "doctor":
        from .doctor import run as run_doctor

        return run_doctor(args, parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if args.command == "demo":
        from .demo import run_demo

        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}")
        return run_demo(args.device, args.repeats)
    from .bench.providers import PROVIDERS

    return bench(argv, args, parser, providers or PROVIDERS)


if __name__ == "__main__":
    sys.exit(main())
