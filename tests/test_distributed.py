"""Synchronized BatchNorm across 2 CPU processes (gloo) equals the single-process full batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.models import resnet

import fusedres
from tests.conftest import fused_backends, randomize_batchnorm

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2


def _blocks(sync: str, backend: str) -> nn.Module:
    """Two converted blocks; ``sync``: 'sync_batchnorm' (nn.SyncBatchNorm layers),
    'process_group' (BatchNorm2d layers, the blocks' process_group set) or 'none'."""
    torch.manual_seed(0)
    norm = nn.SyncBatchNorm if sync == "sync_batchnorm" else nn.BatchNorm2d
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), norm(16))
    net = nn.Sequential(resnet.BasicBlock(8, 16, 2, ds, norm_layer=norm), resnet.Bottleneck(16, 4, norm_layer=norm))
    randomize_batchnorm(net)
    net = fusedres.convert(net, backend=backend).train()
    if sync == "process_group":
        for block in net:
            block.process_group = dist.group.WORLD
    return net


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 8, 10, 10, generator=generator), torch.randn(4, 16, 5, 5, generator=generator)


def _worker(rank: int, port: int, sync: str, backend: str, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        net = _blocks(sync, backend)
        x, g = _data()
        half = slice(2 * rank, 2 * rank + 2)
        out = net(x[half])
        (out * g[half]).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        for grad in grads:
            dist.all_reduce(grad)  # the full-batch gradient is the sum over the halves
        # DDP refuses nn.SyncBatchNorm on CPU modules; the blocks' own process_group is fine.
        ddp = nn.parallel.DistributedDataParallel(_blocks("process_group", backend))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        (ddp(x[half]) * g[half]).sum().backward()
        opt.step()
        results[rank] = {
            "out": out.detach(),
            "grads": grads,
            "buffers": [b.clone() for b in net.buffers()],
            "ddp_params": [p.detach().clone() for p in ddp.parameters()],
        }
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sync", ["sync_batchnorm", "process_group"])
@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu")[:1])
def test_two_process_sync_bn_matches_full_batch(backend, sync):
    """Outputs, summed gradients and running statistics of 2 x half a batch equal one full
    batch; a DDP-wrapped converted model trains a step with its replicas in sync."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), sync, backend, results), nprocs=WORLD, join=True)
    net = _blocks("none", backend)
    x, g = _data()
    out = net(x)
    (out * g).sum().backward()
    torch.testing.assert_close(torch.cat([results[r]["out"] for r in range(WORLD)]), out.detach(), rtol=1e-5, atol=1e-5)
    for rank in range(WORLD):
        for got, expected in zip(results[rank]["grads"], [p.grad for p in net.parameters()]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        for got, expected in zip(results[rank]["buffers"], net.buffers()):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0]["ddp_params"], results[1]["ddp_params"]):
        assert torch.equal(a, b), "DDP replicas diverged"
