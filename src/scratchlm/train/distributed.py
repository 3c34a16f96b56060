"""Processes under torchrun: joining the group, reducing values, DDP / FSDP2 wrapping, the
whole state for saving, and closing the group. World size 1 (no torchrun) makes every
helper here a no-op, so the loop reads the same either way.

DDP replicates the model and averages gradients after the last micro-batch; FSDP2
(``fully_shard``) keeps 1/world of every parameter, gradient and optimizer moment per
process and gathers a block's weights just before it runs.

>>> procs = Processes()
>>> procs.is_main, procs.distributed, all_reduce_values([1.0, 2.0], "cpu", procs)
(True, False, [1.0, 2.0])
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from .precision import pick_device


@dataclass
class Processes:
    """Where this process stands in a torchrun job (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs,
    gloo on CPUs. Each GPU process uses the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), pick_device(device_name)
    import torch.distributed as dist

    procs = Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs, device


def is_main_process() -> bool:
    """True except in the processes of rank > 0 of a torchrun job (they stay quiet)."""
    return int(os.environ.get("RANK", "0")) == 0


def all_reduce_values(values: list[float], device, procs: Processes, op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over every rank; one collective, one host sync."""
    if not procs.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return all_reduce_tensor(t, procs, op).tolist()


def all_reduce_tensor(t: torch.Tensor, procs: Processes, op: str = "sum") -> torch.Tensor:
    """``t`` summed (or max-ed) over every rank, in place; no host sync of its own."""
    if procs.distributed:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Transformer blocks inside ``model`` (its own, or a wrapped backbone's): FSDP2
    shards each on its own, so only one block's full weights exist at a time."""
    return [block for name, module in model.named_modules()
            if name.split(".")[-1] == "blocks" and isinstance(module, torch.nn.ModuleList) for block in module]


def wrap_model(model: torch.nn.Module, procs: Processes, device: torch.device, strategy: str) -> torch.nn.Module:
    """The model to train with: itself (one process), DDP, or FSDP2-sharded in place."""
    if not procs.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (procs.world_size,))
        for block in shard_units(model):  # each block's parameters are gathered just before its use
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, head
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers=False: the only buffers are position tables, equal on every rank
    # (broadcasting them would cost a collective per forward, and trips on non-persistent ones).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its successor flag does not exist yet
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def gradient_sync(model: torch.nn.Module, procs: Processes, sharded: bool, last: bool):
    """Synchronise gradients only after the last micro-batch of a step (DDP / FSDP)."""
    if not procs.distributed:
        return contextlib.nullcontext()
    if sharded:
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else model.no_sync()


def full_state(model: torch.nn.Module, optimizer, sharded: bool,
               with_optimizer: bool) -> tuple[dict | None, dict | None]:
    """(model weights, or None for "the model's own"; optimizer state), whole, for saving.
    Under FSDP every rank must call this: it gathers the shards onto rank 0's CPU."""
    if not sharded:
        return None, optimizer.state_dict() if with_optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    return weights, get_optimizer_state_dict(model, optimizer, options=opts) if with_optimizer else None


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """The whole optimizer state saved by ``full_state``, loaded (and sharded again)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def process_group():
    """Close, on the way out, a process group that was started inside this block.

    A process that exits with a live gloo group can abort in its destructor and take
    torchrun down, so wait for rank 0 (still saving) and destroy the group; the command
    line's entry point (cli/__main__.py) then leaves with ``os._exit`` under torchrun."""
    import torch.distributed as dist

    owned = dist.is_available() and not dist.is_initialized()  # a group we start, we end
    try:
        yield
    except BaseException:
        # No barrier on the way out of a failure: the other ranks may never reach one (they
        # may be waiting in another collective), and torchrun stops them when this one exits.
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if owned and dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()  # rank 0 may still be writing the last checkpoint
        finally:
            dist.destroy_process_group()


__all__ = ["Processes", "init_processes", "is_main_process", "all_reduce_values", "all_reduce_tensor",
           "shard_units", "wrap_model", "gradient_sync", "full_state", "load_optimizer_state", "process_group"]
