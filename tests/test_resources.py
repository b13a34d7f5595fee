"""Resources: no leaked memory or autograd graphs, thread safety, CUDA graphs, 64-bit indexing."""

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from helpers import BACKEND_DEVICE, check_against_reference, make_inputs, rel_error, tolerance

import fastlora

try:
    from fastlora.ops import triton_lora
except ImportError:
    triton_lora = None

CUDA_BACKENDS = [b for b, d in (p.values for p in BACKEND_DEVICE) if d == "cuda"]


class TensorLog(TorchDispatchMode):
    """Weak references to every tensor an op returns while the mode is active: what a step
    allocates, and nothing that other tests left in the process."""

    def __init__(self):
        super().__init__()
        self.tensors: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tensors += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_training_steps_do_not_grow_memory(backend, device):
    x, w, b, A, B = make_inputs(40, 32, 24, 4, torch.float32, device)

    def step():
        fastlora.lora_linear(x, w, b, A, B, 2.0, backend=backend).square().mean().backward()
        for t in (x, b, A, B):
            t.grad = None

    step()  # first call: autotuning, lazy initialisation, caches
    with TensorLog() as log:
        for _ in range(5):
            step()
    gc.collect()  # a reference cycle is not a leak; a tensor still referenced after it is
    assert log.tensors, "the log saw no op: it measures nothing"
    kept = [t for t in (ref() for ref in log.tensors) if t is not None]
    assert not kept, f"{len(kept)} tensors made by the steps outlive them: {[tuple(t.shape) for t in kept]}"


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_graph_and_saved_tensors_are_freed_without_the_garbage_collector(backend, device):
    # With the collector off, only reference counting frees memory: anything kept alive by a
    # reference cycle (e.g. a ctx that holds its own output) would survive below.
    inputs = make_inputs(16, 24, 20, 4, torch.float32, device)
    # The first call in a process imports parts of torch lazily, and those frames hold the call's
    # tensors until the next collection: a one-off, kept out of the measurement.
    fastlora.lora_linear(*inputs, 2.0, backend=backend).sum().backward()
    saved = []

    def pack(t):
        # A detached alias, held by the graph alone (packing `t` itself would tie a saved output to
        # its own grad_fn: a cycle of the test's making).
        alias = t.detach()
        saved.append(weakref.ref(alias))
        return alias

    def forward():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return fastlora.lora_linear(*inputs, 2.0, backend=backend)

    gc.collect()
    gc.disable()
    try:
        out = forward()
        assert saved  # x and x·Aᵀ at least are saved for the backward
        out.sum().backward()
        assert all(r() is None for r in saved), "backward did not free the saved tensors"

        saved.clear()
        out = forward()
        out_ref = weakref.ref(out)
        del out  # a graph never used must go with its output
        assert out_ref() is None and saved and all(r() is None for r in saved)
    finally:
        gc.enable()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_concurrent_calls_from_two_threads(backend, device):
    if backend == "triton" and triton_lora.INTERPRET:
        pytest.skip("Triton's CPU interpreter patches triton.language globally per launch: not thread-safe")
    # Different shapes per thread, so neither can pass by reading the other's results or caches.
    shapes = [(37, 40, 24, 4), (21, 33, 50, 7)]
    barrier = threading.Barrier(len(shapes))

    def worker(shape):
        inputs = make_inputs(*shape[:4], torch.float32, device)
        barrier.wait()  # start together, so the calls overlap
        for _ in range(3):
            check_against_reference(inputs, 1.5, backend)

    with ThreadPoolExecutor(len(shapes)) as pool:
        for future in [pool.submit(worker, s) for s in shapes]:
            future.result()  # re-raises a thread's failure here


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_replay_of_a_training_step_matches_eager(backend):
    x, w, b, A, B = make_inputs(64, 256, 192, 16, torch.bfloat16, "cuda")
    static_x, static_gy = x.detach().clone(), torch.randn(64, 192, dtype=torch.bfloat16, device="cuda")
    static_x.requires_grad_()

    def step():
        out = fastlora.lora_linear(static_x, w, b, A, B, 2.0, backend=backend)
        return (out, *torch.autograd.grad(out, [static_x, b, A, B], static_gy))

    # Autotuning, compilation and allocator warm-up must happen before capture, on a side stream.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_results = step()

    with torch.no_grad():  # new data in the captured input buffers
        static_x.copy_(torch.randn_like(static_x))
        static_gy.copy_(torch.randn_like(static_gy))
    graph.replay()
    eager_results = step()
    for replayed, eager in zip(static_results, eager_results, strict=True):
        assert rel_error(replayed, eager) <= tolerance(torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in CUDA_BACKENDS if b != "torch"])
def test_more_than_2_31_elements_index_correctly(backend):
    k = n = 4096
    m = 2**31 // k + 64  # x, y, grad_x and grad_y each hold more than 2³¹ elements
    gib_needed = 6 * m * k * 2 / 2**30  # the above in bf16, twice (torch backend), plus slack
    if torch.cuda.mem_get_info()[0] / 2**30 < gib_needed:
        pytest.skip(f"needs {gib_needed:.0f} GiB of free GPU memory")
    x, w, b, A, B = make_inputs(m, k, n, 16, torch.bfloat16, "cuda")
    x.requires_grad_()
    gy = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")

    out = fastlora.lora_linear(x, w, b, A, B, 2.0, backend=backend)
    grad_x, grad_A, grad_B = torch.autograd.grad(out, [x, A, B], gy)
    # Rows whose element offsets straddle and pass 2³¹: a 32-bit offset would wrap around there.
    rows = slice(2**31 // k - 128, m)
    x64, gy64 = x[rows].detach().double().requires_grad_(), gy[rows].double()
    ref = fastlora.reference.lora_linear(x64, w.double(), b.double(), A.double(), B.double(), 2.0)
    (ref_grad_x,) = torch.autograd.grad(ref, [x64], gy64)
    assert rel_error(out[rows], ref) <= tolerance(torch.bfloat16, "cuda")
    assert rel_error(grad_x[rows], ref_grad_x) <= tolerance(torch.bfloat16, "cuda")
    del out, grad_x
    # The adapter gradients sum over every row: compare with cuBLAS, via the torch backend.
    out = fastlora.lora_linear(x, w, b, A, B, 2.0, backend="torch")
    torch_grad_A, torch_grad_B = torch.autograd.grad(out, [A, B], gy)
    assert rel_error(grad_A, torch_grad_A) <= tolerance(torch.bfloat16, "cuda")
    assert rel_error(grad_B, torch_grad_B) <= tolerance(torch.bfloat16, "cuda")
