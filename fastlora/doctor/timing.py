"""The time table of ``fastlora doctor``: one LLM shape, on a GPU, in a child process.

``python -m fastlora.doctor.timing BACKEND...`` times, at M=8192, K=N=4096, r=16, bf16 (a
Llama-sized projection over a batch of 8192 tokens), the base layer alone (``F.linear``) and each
named backend's ``lora_linear``, forward and forward+backward (gradients of x and the adapters, the
frozen weight's LoRA case), with CUDA events after warm-up runs (the first autotunes). One JSON line
per row as it is timed: ``{"name", "forward_ms", "train_ms"}`` (or ``"error"``).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPE = {"M": 8192, "K": 4096, "N": 4096, "r": 16, "dtype": "bf16"}
WARMUP, REPS = 3, 10


def _median_ms(run) -> float:
    for _ in range(WARMUP):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_rows(backends: list[str]) -> None:
    import fastlora

    M, K, N, r = SHAPE["M"], SHAPE["K"], SHAPE["N"], SHAPE["r"]
    torch.manual_seed(0)
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(M, K, **kw).requires_grad_()
    weight = torch.randn(N, K, **kw) / K**0.5
    lora_A = (torch.randn(r, K, **kw) / K**0.5).requires_grad_()
    lora_B = (torch.randn(N, r, **kw) / r**0.5).requires_grad_()
    gy = torch.randn(M, N, **kw)

    def step(forward, train: bool):
        def run():
            for t in (x, lora_A, lora_B):
                t.grad = None
            with torch.set_grad_enabled(train):
                y = forward()
                if train:
                    y.backward(gy)

        return run

    rows = [("base F.linear", lambda: F.linear(x, weight))]
    for name in backends:
        rows.append((name, lambda name=name: fastlora.lora_linear(x, weight, None, lora_A, lora_B, 2.0, backend=name)))
    for name, forward in rows:
        try:
            record = {"name": name, "forward_ms": _median_ms(step(forward, False)), "train_ms": _median_ms(step(forward, True))}
        except Exception as err:  # a failing backend is a row of the table, not the table's end
            record = {"name": name, "error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    time_rows(sys.argv[1:])
