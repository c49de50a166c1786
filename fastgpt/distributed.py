"""Running on several processes (``torchrun``): ranks, the process group, collectives the training
loop needs, and each rank's random states, seeded, saved and restored."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastgpt.device import resolve_device


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` run (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """This process's :class:`Distributed` and device: under ``torchrun`` (``RANK`` set) its rank's GPU
    (nccl) or the CPU (gloo), the process group initialised; else one process on
    :func:`fastgpt.device.resolve_device`'s device."""
    if "RANK" not in os.environ:
        return Distributed(), resolve_device(device_name)
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    device = torch.device(f"cuda:{ddp.local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ddp, device


def seed_rank(seed: int, rank: int) -> None:
    """Seed this process's global generators (torch's CPU and CUDA ones, Python's ``random``) with
    ``seed + rank``, as nanoGPT does.

    Each DDP rank then draws its own dropout masks (``nn.Dropout`` and the attention kernel's
    dropout seed come from torch's generator), so the noise is independent across the global batch;
    the initial weights still agree, as DDP broadcasts rank 0's at construction. The batch generator
    is seeded apart, from ``seed`` alone, because every rank draws the same global batch.
    """
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)


def rng_state(device: torch.device) -> dict:
    """This process's global RNG states: torch's CPU generator, Python's, and its CUDA device's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """Set this process's global generators to ``state`` (from :func:`rng_state`)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(ddp: Distributed, device: torch.device) -> list[dict] | None:
    """Every rank's :func:`rng_state` in rank order on rank 0, None on the others. A collective:
    with several ranks, every one must call it."""
    state = rng_state(device)
    if ddp.world_size == 1:
        return [state]
    states = [None] * ddp.world_size if ddp.master else None
    dist.gather_object(state, states, dst=0)
    return states


def saved_rank_states(rng: dict, device: torch.device) -> list[dict]:
    """The per-rank RNG states of a checkpoint's ``rng``. A checkpoint from before they were saved
    per rank holds one process's states, with the CUDA states of all devices: it reads as one rank."""
    if "ranks" in rng:
        return rng["ranks"]
    state = {"torch": rng["torch"], "python": rng["python"]}
    if "cuda" in rng and device.type == "cuda":
        state["cuda"] = rng["cuda"][torch.cuda.current_device() if device.index is None else device.index]
    return [state]


def resume_rng(rng: dict, ddp: Distributed, device: torch.device, seed: int, step: int, say) -> None:
    """Restore this rank's RNG states from a checkpoint's ``rng``.

    With another number of ranks than the checkpoint was saved by there is no state for each rank:
    every rank is reseeded from ``seed``, its rank and ``step`` (reproducible, and distinct from the
    seeds of this run's other ranks), and ``say`` tells so.
    """
    states = saved_rank_states(rng, device)
    if len(states) == ddp.world_size:
        restore_rng(states[ddp.rank], device)
        return
    say(f"note: the checkpoint holds the random states of {len(states)} process(es), this run has "
        f"{ddp.world_size}: dropout is reseeded from seed {seed}, the rank and step {step}, so it "
        "differs from an uninterrupted run")
    seed_rank(seed + step * ddp.world_size, ddp.rank)


def any_rank(ddp: Distributed, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank. A collective: with several ranks, every one must call it."""
    if ddp.world_size == 1:
        return flag
    votes = torch.tensor([int(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def from_rank0(ddp: Distributed, obj):
    """Rank 0's ``obj`` on every rank. A collective: with several ranks, every one must call it."""
    if ddp.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
