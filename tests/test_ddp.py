"""Scale-out: GroupNorm needs no statistics from other ranks (unlike SyncBatchNorm), so plain
DistributedDataParallel just works. Two gloo processes (spawned, 127.0.0.1) train a small CNN
with gnnumba GroupNorm and, side by side, the same CNN on torch.nn.GroupNorm; both ranks must
end bit-identical and match the torch twin."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import torch

_SCRIPT = r"""
import datetime, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gnnumba.torch as gt

STEPS, WORLD = 4, 2


def net(norm):
    torch.manual_seed(0)  # same initial weights on every rank and for both norms
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(4, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), norm(2, 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {"initial": [p.detach().clone() for p in net(nn.GroupNorm).parameters()]}
    for name, norm in (("gnnumba", gt.GroupNorm), ("torch", nn.GroupNorm)):
        model = DDP(net(norm))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
        for _ in range(STEPS):
            x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results[name] = [p.detach().clone() for p in model.module.parameters()]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_identical_and_match_torch(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[1]),
                                            os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for ours0, ours1 in zip(ranks[0]["gnnumba"], ranks[1]["gnnumba"]):
        assert torch.equal(ours0, ours1)  # DDP kept the replicas in lockstep
    for ours, theirs in zip(ranks[0]["gnnumba"], ranks[0]["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # and training did something: every GroupNorm weight moved
    for i in (2, 6):  # parameter indices of the two GroupNorm weights
        assert not torch.equal(ranks[0]["gnnumba"][i], ranks[0]["initial"][i])
