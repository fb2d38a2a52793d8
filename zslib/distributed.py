"""Several training processes, one per GPU (``accelerate launch`` or ``torchrun``), as data parallelism.

Every process holds the whole policy and rolls out its share of each step's questions (whole GRPO
groups, so a group's advantages are computed where all its rows are). A mini-batch's loss is divided by
the counts of the *global* mini-batch (``all_sum``), so the sum of the processes' gradients
(``all_reduce_grads``) is the gradient of one pass over the global mini-batch, whatever the aggregation
mode: the same rule that makes micro-batches exact (``algos.Counts``). Only the main process writes.

With one process (a notebook, ``python -m zslib.train_rl``) every function here is a no-op, so the
single-process results do not change.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group the launcher describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on the
    CPU; each process takes the GPU of its local rank. A long timeout: the main process validates
    alone while the others wait."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Each value summed over the processes."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(parameters, bucket: int = 2 ** 25) -> None:
    """Sum every gradient over the processes, in flat buckets of at most ``bucket`` elements."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    start = 0
    while start < len(grads):
        end, size = start, 0
        while end < len(grads) and (end == start or size + grads[end].numel() <= bucket):
            size += grads[end].numel()
            end += 1
        flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
        dist.all_reduce(flat)
        for g, part in zip(grads[start:end], flat.split([g.numel() for g in grads[start:end]])):
            g.copy_(part.view_as(g))
        start = end


def gather(obj) -> list:
    """Every process's ``obj``, in rank order (on every process)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
