"""The file in which ``backend="auto"`` remembers its measured choices across processes.

``<cache dir>/autotune.json`` (``FASTLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastlora``, else
``~/.cache/fastlora``) holds ``{"format": CACHE_FORMAT, "environments": {environment key: {problem
key: entry}}}``; an entry is ``{"backend": name, "times_ms": {backend: median ms, or why it was
excluded}}``. The environment key is the GPU name and the driver, torch, triton and fastlora
versions. Files of the format before the correctness gate (``fastlora-autotune/1``, whose choices
were never checked) are dropped silently; any other unreadable or foreign file costs one warning.
Both are rewritten at the next measurement.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import json
import os
import threading
import warnings
from pathlib import Path

import torch

CACHE_FORMAT = "fastlora-autotune/2"
_UNCHECKED_FORMATS = ("fastlora-autotune/1",)


def cache_path() -> Path:
    """Where measured choices are kept: ``$FASTLORA_CACHE_DIR/autotune.json``, else under
    ``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``."""
    root = os.environ.get("FASTLORA_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlora"
    return Path(root) / "autotune.json"


@functools.cache
def _driver_version() -> str:
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache
def environment_key(device: torch.device) -> str:
    """What a measurement depends on besides the problem: GPU name and software versions."""
    from .. import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (
        f"{name} | driver {_driver_version()} | torch {torch.__version__} | "
        f"triton {_package_version('triton')} | fastlora {__version__}"
    )


def read_disk(path: Path, *, warn: bool) -> dict:
    """The file's environments (``{env key: {problem key: entry}}``), or {} (warning once if asked)
    when it is missing, corrupt or not fastlora's."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        problem = f"it could not be read ({type(err).__name__}: {err})"
    else:
        environments = data.get("environments") if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("format") == CACHE_FORMAT and isinstance(environments, dict):
            return environments
        if isinstance(data, dict) and data.get("format") in _UNCHECKED_FORMATS:
            return {}  # ours, from before the correctness gate: its choices are re-measured
        problem = f"it is not a {CACHE_FORMAT} file"
    if warn:
        message = f"fastlora: ignoring the autotune cache {path}: {problem}; it is rewritten at the next measurement"
        warnings.warn(message, RuntimeWarning, stacklevel=6)
    return {}


def write_environments(path: Path, file_format: str, environments: dict) -> str | None:
    """Write ``{"format": file_format, "environments": environments}`` to ``path`` atomically (a
    reader sees the old file or the new one); None, or why it could not be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        temporary.write_text(json.dumps({"format": file_format, "environments": environments}, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError as err:
        return f"could not write {path}: {err}"
    return None


def write_disk(path: Path, env: str, key: str, entry: dict) -> None:
    """Add ``entry`` under ``env`` / ``key``, keeping what other processes wrote meanwhile."""
    environments = read_disk(path, warn=False)
    environments.setdefault(env, {})[key] = entry
    problem = write_environments(path, CACHE_FORMAT, environments)
    if problem is not None:
        warnings.warn(f"fastlora: autotune cache: {problem}", RuntimeWarning, stacklevel=6)


DOCTOR_FORMAT = "fastlora-doctor/1"


def doctor_path() -> Path:
    """``doctor.json`` beside ``autotune.json``: the verdicts of ``fastlora doctor`` (``fastlora.doctor``)."""
    return cache_path().parent / "doctor.json"


def read_doctor(path: Path) -> dict:
    """``{environment key: {"verdicts": {backend: {"pass", "detail"}}, ...}}``, or {} if unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not (isinstance(data, dict) and data.get("format") == DOCTOR_FORMAT and isinstance(data.get("environments"), dict)):
        return {}
    return data["environments"]


def doctor_failures(env: str) -> dict[str, str]:
    """``{backend: what failed}`` for the backends that the last ``fastlora doctor`` run in this
    environment (``env``, ``environment_key``'s) found wrong, hung or crashing; {} if none or no run."""
    entry = read_doctor(doctor_path()).get(env, {})
    verdicts = entry.get("verdicts") if isinstance(entry, dict) else None
    if not isinstance(verdicts, dict):
        return {}
    return {
        name: str(v.get("detail", "failed"))
        for name, v in verdicts.items()
        if isinstance(v, dict) and v.get("pass") is False
    }
