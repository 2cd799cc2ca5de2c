"""Data parallelism over the processes torchrun starts (docs/method.md#data-parallel-training).

Every rank draws the same global batch from the same seeded generators. Of a step's M
microbatches, rank r of W trains the whole microbatches r, r + W, r + 2W, ... below
W * floor(M / W) and its contiguous share of the rows of each of the M mod W left over, so that
ranks differ by at most one row of each left-over microbatch. A piece p of microbatch m (all of
it or a share) adds |p| / |m| * L_p / M to the loss it differentiates (L_p: p's mean loss), so
the pieces of m, on whatever ranks, add up to L_m / M and the sum over ranks of the gradients
is that of the mean loss over the step's microbatches, as one process computes it. One
all-reduce after the step's last microbatch gives it to every rank (no communication during
accumulation). Validation is split by rows and its sums reduced. A single process is a world of
one: nothing changes.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; the process group is NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any process group exists: see leave

BUCKET_ELEMENTS = 2**24  # gradients all-reduced 64 MB (fp32) at a time
# how long a rank waits in a collective for the others: longer than rank 0 takes for what only it
# does (writing a checkpoint, the samples) while the others wait at their next collective; the
# token cache is prepared before any rank joins (fwbw.training.trainer.load_data_alone). A dead
# rank is noticed by torchrun, which stops the others, far sooner
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)


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

    def microbatches(self, count: int) -> list[int]:
        """The indices of the step's `count` microbatches that this rank trains all or a share of
        (part): the whole ones r, r + W, ... below W * floor(count / W), then those left over."""
        whole = self._whole(count)
        return [*range(self.rank, whole, self.world_size), *range(whole, count)]

    def part(self, index: int, count: int, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of microbatch `index` of the step's `count`: all of one it trains
        whole, its share of one left over."""
        return rows if index < self._whole(count) else self.share(rows)

    def largest_part(self, count: int, rows: int) -> int:
        """The most rows that any rank trains of one of `count` microbatches of `rows` rows."""
        return rows if count >= self.world_size else math.ceil(rows / self.world_size)

    def _whole(self, count: int) -> int:
        """How many of `count` microbatches go to ranks whole: the largest multiple of W."""
        return count - count % self.world_size

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


@contextlib.contextmanager
def one_process_at_a_time(lock: Path):
    """Held by one process at a time: an exclusive lock on the file `lock` (created if missing),
    which the processes of every run on this machine (and on others that share its filesystem)
    queue for without a timeout. Where it cannot be had (a read-only folder, which no process
    writes to either, or a filesystem without locks) every process goes ahead."""
    with contextlib.ExitStack() as stack:  # closing the file releases the lock
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fcntl.flock(stack.enter_context(open(lock, "a")), fcntl.LOCK_EX)
        except OSError:
            pass
        yield


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
        atexit.register(_leave_after_failure)
    return DataParallel(rank=rank, world_size=world_size, local_rank=local_rank)


def leave() -> None:
    """Wait for every rank to finish its run, then leave the process group (nothing to do in a
    plain process). Leaving ends the group's threads (gloo's workers and its socket loop): one
    still running while the interpreter finalizes can abort the process ("terminate called
    without an active exception", exit code -6) after its run succeeded. It ends them only if
    nothing else holds the group: torch.distributed.nn, once imported, holds the group of the
    moment in its functions' default arguments, hence its import above, before any group exists
    (torch._dynamo imports it, and torch.optim imports that when the trainer builds its
    optimizer). Only after success: a rank that failed exits without waiting
    (_leave_after_failure) and torchrun stops the others, which may be waiting in a collective."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _leave_after_failure() -> None:
    """At the exit of a rank that did not leave (it failed), before the interpreter finalizes:
    leave a gloo group all the same, for the reason in `leave`. An NCCL group is left to its
    destructor: destroying one while other ranks wait in a collective can block."""
    if dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()
