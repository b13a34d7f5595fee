"""Data parallelism over two CPU processes (gloo, loopback only) gives one process's loss and grads:
DistributedDataParallel, and FSDP2 (``fully_shard``) with the adapters sharded across the ranks."""

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastlora import FusedLoRALinear, replace_linear_with_lora

WORLD_SIZE = 2
TIMEOUT_S = 60


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    replace_linear_with_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)


def lora_grads(model: nn.Module) -> dict:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = small_model()
        x, y = (t.chunk(WORLD_SIZE)[rank] for t in batch())
        ddp = nn.parallel.DistributedDataParallel(model)  # kept alive: its reducer all-reduces in backward
        F.mse_loss(ddp(x), y).backward()
        torch.save(lora_grads(model), f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other's last collective is in flight
    finally:
        dist.destroy_process_group()


def _fsdp2_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = small_model()
        for layer in model:
            if isinstance(layer, FusedLoRALinear):
                fully_shard(layer)  # one all-gather per layer, as in a transformer block
        fully_shard(model)
        sharded = dict(model.named_parameters())["0.lora_A"]
        assert isinstance(sharded, DTensor) and sharded.placements == (Shard(0),), "fully_shard did not shard"
        x, y = (t.chunk(WORLD_SIZE)[rank] for t in batch())
        loss = F.mse_loss(model(x), y)
        loss.backward()  # FSDP2 reduce-scatters the grads, averaged over the ranks
        dist.all_reduce(loss.detach(), op=dist.ReduceOp.AVG)
        grads = {name: g.full_tensor() for name, g in lora_grads(model).items()}
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other's last collective is in flight
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, out_dir, monkeypatch) -> None:
    loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback)  # gloo's transport stays on the loopback device
    workers = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the workers did not finish within {TIMEOUT_S} s")


def single_process():
    """Loss and LoRA grads of the whole batch in one process: what the ranks together must give."""
    model, (x, y) = small_model(), batch()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    expected = lora_grads(model)
    assert set(expected) == {f"{i}.lora_{ab}" for i in (0, 2) for ab in "AB"}
    return loss.detach(), expected


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path, monkeypatch):
    run_workers(_ddp_worker, tmp_path, monkeypatch)
    _, expected = single_process()
    for rank in range(WORLD_SIZE):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        # DDP averages the ranks' grads of their half-batch means: the grads of the full-batch mean.
        assert grads.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_matches_single_process(tmp_path, monkeypatch):
    run_workers(_fsdp2_worker, tmp_path, monkeypatch)
    expected_loss, expected = single_process()
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], expected_loss, rtol=1e-5, atol=1e-6)
        assert result["grads"].keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(result["grads"][name], expected[name], rtol=1e-5, atol=1e-6)
