"""Sharded generation under ``torchrun``: each rank generates every N-th batch, rank 0 writes all.

``torchrun --nproc-per-node N $(which fairseq-generate) ... --task translation_fast`` starts N
processes with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set. Each one takes the batches
``rank, rank + N, ...`` of fairseq's own batching (batches are bounded by ``--max-tokens``,
so ranks get about the same number of tokens), generates and post-processes them, and
sends the formatted batches to rank 0, which writes them in the single-process order: the
output is the one a single process writes, line for line, with one score over the whole set.

A rank that dies ends the run: torchrun stops the others and names the failed rank, and a
rank left waiting in a collective gives up after ``--distributed-timeout-seconds``.

fairseq's own generate loop knows nothing of torchrun: under it, every rank would generate
the whole subset and write it, so ``refuse_unsharded_run`` stops such a run before it
loads anything.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist


class UnshardedRunError(RuntimeError):
    """A torchrun job whose task does not shard its generation over the ranks."""


def refuse_unsharded_run(task: Optional[str], sharded_tasks: Sequence[str]) -> None:
    """Raise ``UnshardedRunError`` under torchrun (``WORLD_SIZE`` > 1) unless ``task`` shards."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and task not in sharded_tasks:
        raise UnshardedRunError(
            f"fairseq-generate --task {task} runs under torchrun (WORLD_SIZE={world}), but its "
            f"generate loop does not shard: each of the {world} ranks would generate the whole "
            f"subset and write it. Use --task {' or --task '.join(sharded_tasks)} (the same data-bins, "
            "checkpoints and flags), which gives each rank its share of the batches and writes one "
            "output on rank 0, or run a single process."
        )


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls, timeout_seconds: float) -> "Ranks":
        """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(seconds=timeout_seconds),
        )
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    @property
    def writes_output(self) -> bool:
        return self.rank == 0

    def global_batch_index(self, local_index: int) -> int:
        """fairseq's ``ShardedIterator`` gives rank r the batches r, r + world, r + 2 world, ..."""
        return local_index * self.world + self.rank

    def gather(self, value: Any) -> List[Any]:
        """Every rank's ``value`` on rank 0 (in rank order); ``[]`` on the other ranks."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world if self.writes_output else None
        dist.gather_object(value, gathered, dst=0)
        return gathered or []

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
