"""Several training processes, one per GPU (``accelerate launch`` or ``torchrun``), as data parallelism.

Every process holds the whole policy and rolls out its share of each step's questions (whole GRPO
groups, so a group's advantages are computed where all its rows are). A mini-batch's loss is divided by
the counts of the *global* mini-batch (``all_sum``), so the sum of the processes' gradients
(``all_reduce_grads``) is the gradient of one pass over the global mini-batch, whatever the aggregation
mode: the same rule that makes micro-batches exact (``algos.Counts``). Only the main process writes.

With ``rl.fsdp`` the policy and reference are also sharded (FSDP2, ``shard``): each process holds a part of
the weights, gradients and optimiser state, for a policy that does not fit one GPU whole; the whole weights are
gathered (``full_state_dict``, every process taking part) for decoding, checkpoints and the saved policy.

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


# ---------------------------------------------------------------- sharding (FSDP2), ``rl.fsdp``

def shard(model):
    """Shard ``model`` over the processes with FSDP2: each decoder layer is a unit of its own (its weights
    gathered just before it runs, freed after), the rest (embeddings, final norm, a tied output layer) the
    root. Every process then holds 1/N of the weights, and so of the gradients and optimiser state."""
    from torch.distributed.fsdp import fully_shard
    for layer in _decoder(model).layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_state_dict(model) -> dict:
    """The whole weights, on every process (a collective when ``model`` is sharded: all must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def load_full_state_dict(model, state: dict) -> None:
    """Whole weights into ``model``, each process keeping its shard when it is sharded."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state keyed by parameter names, whole (a collective when ``model`` is sharded):
    loadable by any number of processes, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _decoder(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()
