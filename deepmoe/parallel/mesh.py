"""The device mesh: which ranks shard which state, and which exchange tokens.

Two dimensions, (dp_shard, ep), expert-parallel innermost so that an EP group is made of adjacent ranks
(the GPUs of one node, where all-to-all rides NVLink):
- `ep`: the ranks of one row split the routed experts between them (E / ep each) and exchange tokens by
  all-to-all; they still read different data, so for everything except the routed experts they are data
  parallel like any other pair of ranks.
- `dp_shard`: the ranks of one column hold the same experts and shard them (FSDP) between them.
Every rank reads its own slice of the global batch, so the parameters outside the routed experts (attention,
dense and shared MLPs, norms, embedding, head) are sharded over all world ranks: the flattened `dp` mesh.
With ep = 1 this is plain FSDP over the world; with ep = world each expert lives on exactly one rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class ParallelError(ValueError):
    """A parallel layout that cannot run: the message names the rank and what to change."""


@dataclass(frozen=True)
class Process:
    """This process's place in a torchrun launch (its environment variables)."""
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> Process:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)


def check_layout(world_size: int, ep: int, n_experts: int | None, rank: int = 0) -> int:
    """dp_shard = world / ep, or a ParallelError naming the rank and the sizes that do not fit."""
    if ep < 1:
        raise ParallelError(f"rank {rank}: --ep must be >= 1, got {ep}")
    if world_size % ep:
        raise ParallelError(f"rank {rank}: the world size {world_size} does not fit the mesh (dp_shard, ep) with "
                            f"ep={ep}: it must be a multiple of ep (launch a multiple of {ep} processes, or pick an "
                            f"--ep that divides {world_size})")
    if ep > 1 and n_experts is None:
        raise ParallelError(f"rank {rank}: --ep {ep} needs a model with routed experts; this one has none")
    if n_experts is not None and n_experts % ep:
        raise ParallelError(f"rank {rank}: {n_experts} routed experts cannot be split evenly over ep={ep} ranks; "
                            f"choose an --ep that divides {n_experts}")
    return world_size // ep


def init_distributed(device: str) -> tuple[Process, torch.device]:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for CPU) → (process, this rank's device)."""
    proc = Process.from_env()
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", proc.local_rank)  # one GPU per local rank, whatever index --device named
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        store = None  # the default: torchrun's store, reached through MASTER_ADDR / MASTER_PORT
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt:
            # torchrun keeps one store across restarts, and the failed attempt's keys (the dead ranks' gloo
            # addresses) are still in it: a restarted rank may read one and wait on a dead process. Seen with
            # torch 2.13 (parallel/elastic.py). Each attempt gets keys of its own.
            base, _, _ = next(dist.rendezvous("env://", proc.rank, proc.world_size))
            store = dist.PrefixStore(f"deepmoe/attempt-{attempt}", base)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=proc.rank,
                                world_size=proc.world_size, device_id=dev if dev.type == "cuda" else None)
    return proc, dev


@dataclass(frozen=True)
class ParallelMesh:
    """The 2-D mesh and its views: `dp_shard` and `ep` (its dimensions) and `dp` (both flattened: the world)."""
    mesh: DeviceMesh

    def __post_init__(self):
        # torch wants the flattened mesh kept by its user rather than sliced from the root by name
        object.__setattr__(self, "dp", self.mesh._flatten("dp"))

    @property
    def dp_shard(self) -> DeviceMesh:
        return self.mesh["dp_shard"]

    @property
    def ep(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def device_type(self) -> str:
        return self.mesh.device_type


def build_mesh(device_type: str, world_size: int, ep: int, n_experts: int | None, rank: int = 0) -> ParallelMesh:
    """The mesh ("dp_shard", "ep") over the world, or a ParallelError if the sizes do not fit."""
    dp_shard = check_layout(world_size, ep, n_experts, rank)
    return ParallelMesh(init_device_mesh(device_type, (dp_shard, ep), mesh_dim_names=("dp_shard", "ep")))
