"""Run one check in a child process with a deadline, reading its JSON lines as they come.

A child that hangs is killed at the deadline (its whole process group), and one that dies (an
illegal address aborts a CUDA process) is reported with its exit status and last stderr line: in
both cases the last ``{"start": ...}`` line without its result names the problem it was on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple


class ChildResult(NamedTuple):
    """The child's JSON ``records`` in order; ``timed_out``; its ``returncode`` (None if killed);
    ``stderr``'s last lines; ``seconds`` it ran."""

    records: list[dict]
    timed_out: bool
    returncode: int | None
    stderr_tail: str
    seconds: float


def _env() -> dict:
    """The child's environment: this process's, with the fastlora it runs importable first."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(module: str, args: list[str], timeout: float, on_record=None) -> ChildResult:
    """``python -m module *args`` with ``timeout`` seconds; ``on_record(record)`` sees each JSON line."""
    records: list[dict] = []
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=stderr, text=True,
            env=_env(), start_new_session=True,  # its own process group: a kill reaches its compilers too
        )  # fmt: skip

        def read():
            for line in proc.stdout:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a library's print, not ours
                if isinstance(record, dict):
                    records.append(record)
                    if on_record is not None:
                        on_record(record)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        reader.join(timeout=5)
        stderr.seek(0)
        tail = "\n".join(stderr.read().strip().splitlines()[-5:])
    return ChildResult(records, timed_out, None if timed_out else proc.returncode, tail, time.monotonic() - start)


def describe_exit(returncode: int) -> str:
    """``"exit status 3"`` or ``"killed by SIGABRT"``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"
