"""Data-parallel training under torchrun: torch.distributed + DDP (gloo on CPU, NCCL on GPU).

Launch: `torchrun --nproc_per_node N -m nima_edge.train [train options]`. Without torchrun's
environment (WORLD_SIZE unset) everything here degrades to a single process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nima_edge.errors import NimaError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: torch.nn.Module, sync: bool):
        """Skip the gradient all-reduce on accumulation micro-steps; only the last one syncs."""
        if self.world == 1 or sync:
            return contextlib.nullcontext()
        return model.no_sync()

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank (stop decisions, the clock), so all ranks agree."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def total(self, value: int) -> int:
        """The sum of `value` over all ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj` on rank 0 (a list on rank 0, None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise NimaError("device cuda was asked for but no CUDA GPU is visible", "use device = \"cpu\" or \"auto\"")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)
