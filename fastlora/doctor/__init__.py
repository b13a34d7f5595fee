"""``python -m fastlora doctor``: is fastlora correct on this machine? A minute's answer, per backend.

It prints what is installed (python, torch, triton, CUDA, ``fastlora._C`` and the archs it carries,
the GPU and its capability), then checks each backend (``torch``, ``triton``, ``cuda``, and
``triton-4bit``, the fused QLoRA path, where bitsandbytes and a GPU are here) on a handful of
problems: odd shapes (M = 1, M = 37, K and N off the block sizes), bf16, fp16 and fp32, fp32
adapters on bf16, dropout, r = 1 and r = 16, forward and every gradient against the float64
reference by the tolerance table (``fastlora.doctor.checks``). Each backend runs in its own child
process under a deadline, so that a hang or an illegal address is reported, naming the problem it
struck, rather than inherited. On a GPU a time table follows: one LLM shape (M=8192, K=N=4096, r=16,
bf16) for the base ``F.linear`` and each passing backend (``fastlora.doctor.timing``).

One verdict line per backend: ``pass``, ``fail: what``, or ``unavailable: why``; ``--json`` prints
the whole report as JSON instead. Exit status 0 when every available backend passes, else 1.

On a CPU the torch backend is checked, and triton only under Triton's interpreter when the user
has set ``TRITON_INTERPRET=1`` (slow; without it triton is "unavailable" here, saying so).

Verdicts are kept in ``<cache dir>/doctor.json`` (beside ``auto``'s ``autotune.json``), under the
same environment key as ``auto``'s measurements (GPU, driver, torch, triton, fastlora versions):
``cached_verdicts(device)`` reads them back as ``{backend: passed}``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..ops.autotune_cache import DOCTOR_FORMAT as CACHE_FORMAT
from ..ops.autotune_cache import doctor_path as cache_file
from ..ops.autotune_cache import read_doctor as _read
from ..ops.autotune_cache import write_environments

_write_lock = threading.Lock()


def cached_verdicts(device: str | torch.device) -> dict[str, bool]:
    """``{backend: passed}`` from the last ``fastlora doctor`` run in this environment (GPU, driver
    and versions, as ``auto`` keys its cache) for tensors on ``device``; {} if none. Backends that
    were unavailable are absent."""
    from ..ops.auto import environment_key

    device = torch.device(device)
    entry = _read(cache_file()).get(environment_key(device), {})
    verdicts = entry.get("verdicts") if isinstance(entry, dict) else None
    if not isinstance(verdicts, dict):
        return {}
    return {name: v["pass"] for name, v in verdicts.items() if isinstance(v, dict) and isinstance(v.get("pass"), bool)}


def store_verdicts(device: torch.device, verdicts: dict[str, dict], date: str) -> Path | str:
    """Write the pass/fail ``verdicts`` (``{backend: {"verdict", "detail"}}``) of ``device``'s
    environment; the path written, or why it could not be."""
    from ..ops.auto import environment_key

    path = cache_file()
    kept = {name: {"pass": v["verdict"] == "pass", "detail": v["detail"]} for name, v in verdicts.items() if v["verdict"] != "unavailable"}
    with _write_lock:
        environments = _read(path)
        environments[environment_key(device)] = {"date": date, "verdicts": kept}
        problem = write_environments(path, CACHE_FORMAT, environments)
    if problem is not None:
        return problem
    return path


def add_arguments(parser) -> None:
    """The options of ``fastlora doctor``."""
    from .checks import BACKENDS

    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--json", action="store_true", help="print the report as JSON (progress goes to stderr)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds each backend's check (and the time table) may take before it is killed and "
                        "reported as a timeout (default: 120)")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default, help=f"default: {default}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)} (default: all)")
    parser.add_argument("--no-timing", action="store_true", help="skip the time table (GPU only anyway)")


def run(args, parser) -> int:
    """``fastlora doctor`` with parsed ``args``; the exit status."""
    from .checks import BACKENDS
    from .report import doctor

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"--backends: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    return doctor(backends, args.device, args.timeout, as_json=args.json, timing=not args.no_timing)
