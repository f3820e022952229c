"""This process's place in a training job: a lone process, or one of torchrun's DDP workers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Workers", "backend_for"]


def backend_for(device: torch.device) -> str:
    """The process group's backends for training on ``device``: gloo for CPU tensors whatever the device (the
    loop's sums and votes are CPU float64), NCCL for the CUDA tensors DDP reduces when training on GPUs.
    An NCCL-only group would refuse the CPU reductions ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class Workers:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a lone process."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls) -> Workers:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if world_size > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend_for(device))
        return cls(int(os.environ.get("RANK", "0")), world_size, device)

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: ``model`` itself, or wrapped in DistributedDataParallel."""
        if not self.distributed:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def broadcast_from_main(self, model: nn.Module) -> None:
        """Give every process rank 0's weights and buffers (BatchNorm statistics are per process)."""
        if self.distributed:
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, 0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over this job's workers (on the CPU, in float64: counts stay exact); a lone process's
        own values, even inside a process group someone else started (a lone job must not wait on its peers)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def all_agree(self, flag: bool) -> bool:
        """True only if ``flag`` holds in every process (they must take the same branch)."""
        return self.sum([0.0 if flag else 1.0])[0] == 0.0
