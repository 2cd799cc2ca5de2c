"""Data parallelism over the processes torchrun starts (docs/method.md#data-parallel-training).

Every rank draws the same global batch from the same seeded generators and trains on its own
contiguous share of the rows. Its loss is weighted by its share of the rows, so the sum of the
ranks' gradients is the gradient of the global batch's mean loss, which one all-reduce after the
step's last microbatch gives every rank (no communication during accumulation). Validation is
split the same way and its sums reduced. A single process is a world of one: nothing changes.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; the process group is NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 2**24  # gradients all-reduced 64 MB (fp32) at a time
# how long a rank waits in a collective for the others: long enough for rank 0 to download and
# tokenize a corpus while the others wait for it (RunSetup); a dead rank is noticed by torchrun,
# which stops the others, far sooner
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks of one run (world_size 1: a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes the run directory."""
        return self.rank == 0

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (sizes differ by at most one row)."""
        return rows.tensor_split(self.world_size)[self.rank]


    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks, in place (on any device: NCCL reduces a copy on the GPU)."""
        if self.world_size > 1:
            reduced = tensor.to(self._device())
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
            tensor.copy_(reduced)
        return tensor

    def sum_gradients(self, parameters) -> None:
        """Replace every parameter's gradient by its sum over ranks, in buckets of flattened grads."""
        if self.world_size == 1:
            return
        bucket: list[torch.Tensor] = []
        elements = 0
        for grad in (p.grad for p in parameters if p.grad is not None):
            bucket.append(grad)
            elements += grad.numel()
            if elements >= BUCKET_ELEMENTS:
                self._all_reduce_bucket(bucket)
                bucket, elements = [], 0
        if bucket:
            self._all_reduce_bucket(bucket)

    def _all_reduce_bucket(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(reduced.view_as(grad))

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters to every rank."""
        if self.world_size > 1:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on some rank."""
        return bool(self.all_reduce_sum(torch.tensor([int(flag)]))[0] > 0)

    def same_everywhere(self, value: int) -> bool:
        """Whether every rank holds the same integer."""
        if self.world_size == 1:
            return True
        values = torch.tensor([value, -value], device=self._device())
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return int(values[0]) == value and int(values[1]) == -value

    def _device(self) -> torch.device:
        backend = dist.get_backend() if self.world_size > 1 else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


SINGLE_PROCESS = DataParallel()


def is_main_process() -> bool:
    """Rank 0 of the processes torchrun started, or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def from_environment(device_type: str) -> DataParallel:
    """This process's rank among those torchrun started (WORLD_SIZE, RANK, LOCAL_RANK), joining
    their process group (NCCL on CUDA, gloo on CPU) on first use; a plain process is a world of
    one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE_PROCESS
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return DataParallel(rank=rank, world_size=world_size, local_rank=local_rank)


def leave() -> None:
    """Wait for every rank to finish its run, then leave the process group (nothing to do in a
    plain process). Only after success: a rank that failed exits and torchrun stops the others,
    which may be waiting in a collective."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
