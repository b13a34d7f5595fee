"""Which of the Triton backward's two designs runs a problem (``triton_lora.triton_backward``):

    "fused": the gy pass (grad_x = gy·W + scaling·D(gy B)·A, t = gy B) also writes the grad_B / bias
             partials of the gy tiles it streams (FUSE_GRAD_B), which holds grad_x to small tiles
             (GRAD_X_CONFIGS: 128×64 at r ≤ 32, 64×64 at r = 64; larger ones spilled);
             then grad_A's split-M reduction, then the finalize.  gy is read once.
    "split": the gy pass at the forward's full tiles (GPU_CONFIGS, pruned as the forward's), then ONE
             grouped reduction over M for grad_A = scaling·(gy B)ᵀ·D(x), grad_B = scaling·gyᵀ·xa and
             the bias Σ_m gy (``_triton_grouped_reduce``), then the finalize.  gy is read twice.

Both are 3 launches with no memset and no other ATen op (fewer for fewer gradients), deterministic.
Which is faster depends on the shape and the GPU (bigger grad_x tiles against a second read of gy),
so on a GPU it is measured: the first backward of a problem key (``problem_key``: M's power-of-two
bucket, N, K, R_PAD, the dtypes, dropout on/off, which gradients, fp32 matmul precision, the device)
runs each variant once untimed (their kernels autotune and compile), then times both whole backwards
with ``_time_variant`` (``_triton_common.autotune_bench``: Triton's benchmark) and keeps the faster
for the process (``chosen()``). It happens under ``on_device``'s re-entrant launch lock, so two
threads never time one key at once, and every timed run writes fresh buffers of its own (the call's
result comes from one more run of the winner): nothing accumulates into the caller's tensors.
Inside a CUDA-graph capture an undecided key raises ``CaptureAutotuneError`` (timing would
synchronise the device), as the autotuners do: run the step once eagerly before capturing.

``FASTLORA_TRITON_BACKWARD`` (read at every backward that has a choice to make): ``fused``,
``split`` or ``auto`` (the default: measured on a GPU; ``fused`` under ``TRITON_INTERPRET=1``, where
nothing can be timed, so the CPU suite and the launch census see the fused variant unless told, and
under ``torch.use_deterministic_algorithms(True)``, since the variants round differently and a
measured choice could differ between processes).
The choice is in-process only (not written to ``autotune_cache``'s file).
"""

from __future__ import annotations

import os
import warnings

from . import _triton_common
from ._triton_common import INTERPRET, CaptureAutotuneError, autotune_bench, on_device

ENV = "FASTLORA_TRITON_BACKWARD"
VARIANTS = ("fused", "split")
MODES = (*VARIANTS, "auto")
UNTIMED_DEFAULT = "fused"
# Where "auto" measures (the interpreter cannot time; the tests stand CPU tensors in).
TIMED_DEVICE_TYPES: tuple[str, ...] = () if INTERPRET else ("cuda",)

# problem key -> winning variant; problem key -> {variant: median ms, or why it was excluded}.
_chosen: dict[tuple, str] = {}
_times: dict[tuple, dict[str, object]] = {}


def requested() -> str:
    """``FASTLORA_TRITON_BACKWARD``, or ``"auto"`` when unset or empty; ValueError for any other value."""
    mode = os.environ.get(ENV) or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def chosen() -> dict[tuple, tuple[str, dict[str, object]]]:
    """What was measured in this process: ``{problem key: (winner, {variant: ms or why excluded})}``."""
    return {key: (winner, dict(_times.get(key, {}))) for key, winner in _chosen.items()}


def clear() -> None:
    """Forget every measured choice (the next backward of each key measures again)."""
    with _triton_common._LAUNCH_LOCK:
        _chosen.clear()
        _times.clear()


def _time_variant(run) -> float:
    """Median milliseconds of ``run()`` (one whole backward), by the benchmark the autotuners use
    (it refuses inside a CUDA-graph capture). The tests replace it."""
    return autotune_bench(run, (0.5, 0.2, 0.8))[0]


def choose(key: tuple, device, run) -> str:
    """The variant for problem ``key`` on ``device``: the cached one, else measured now (module doc).
    ``run(variant)`` runs one whole backward of that variant on the call's tensors (fresh outputs).
    A variant that raises while it is tried is left out (with a warning) if the other one runs."""
    winner = _chosen.get(key)
    if winner is not None:
        return winner
    with on_device(device):  # the launch lock: one measurement of a key at a time; re-entrant for the runs
        winner = _chosen.get(key)
        if winner is not None:
            return winner
        if getattr(_triton_common._launch_state, "capturing", False):
            raise CaptureAutotuneError(
                "fastlora: the Triton backward would time its two variants inside CUDA-graph capture (this "
                "problem was not run eagerly yet in this process, and timing synchronises the device). Run the "
                f"step once eagerly with the same shapes before capturing (the usual warm-up), or set {ENV}=fused "
                "or split."
            )
        times: dict[str, object] = {}
        ran = []  # the variants whose untimed run succeeded
        for variant in VARIANTS:
            try:
                run(variant)  # untimed: its kernels autotune and compile here, outside the timing
                ran.append(variant)
                times[variant] = _time_variant(lambda v=variant: run(v))
            except CaptureAutotuneError:
                raise
            except Exception as err:  # noqa: BLE001  (the other variant may still run)
                times[variant] = f"{type(err).__name__}: {err}"
        timed = {v: float(ms) for v, ms in times.items() if not isinstance(ms, str)}
        if not timed:
            if not ran:
                raise RuntimeError(f"fastlora: every Triton backward variant failed for {key}: {times}")
            # They ran but could not be timed (out of memory for the benchmark's cache flush, a
            # sync-debug mode...): the default, untimed, kept for the process like a timed choice.
            winner = UNTIMED_DEFAULT if UNTIMED_DEFAULT in ran else ran[0]
            warnings.warn(f"fastlora: the Triton backward variants could not be timed for {key} ({times}); "
                          f"running {winner!r} untimed", RuntimeWarning, stacklevel=3)  # fmt: skip
            _times[key], _chosen[key] = times, winner
            return winner
        if len(timed) < len(times):
            message = f"fastlora: Triton backward variants left out for {key}: {times}"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        winner = min(timed, key=timed.get)  # on a tie the first of VARIANTS ("fused")
        _times[key] = times
        _chosen[key] = winner
    return winner
