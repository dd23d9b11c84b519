"""Checkpoints of a distributed run: sharded `torch.distributed.checkpoint` (DCP) saves, resumed on any world
size and expert-parallel layout, and the final model exported as one Hugging Face directory.

    RUN/checkpoints/step-0000500/
        config.json, tokenizer.json, train_config.json   rank 0: the model's config, the run's files
        dcp/.metadata, dcp/__R_N.distcp                   every rank R its own shards of the model's weights and
                                                         of the AdamW moments, under the single-device names
        trainer_state/state.json                         rank 0: step, tokens, counters, sampler, "format": "dcp"
        trainer_state/shards.json                        size and CRC-32 of every .distcp file (by writer rank)

The same atomic "last good checkpoint" rule as one device (train/state.py): rank 0 makes the hidden temp
directory `.step-N.XXXXXXXX` and tells every rank its name, each rank writes its shards into it (fsynced by DCP),
DCP's finish step gathers every rank's write results before rank 0 writes `.metadata`, and rank 0 renames the
directory to `step-N` only after that and its own files; every rank then learns whether the rename happened.
A crash at any point leaves `step-N` absent and the previous checkpoint the newest complete one; the temp
directory is removed when the run next starts (`remove_interrupted_saves`). The run directory must be one
file system every rank sees (a shared one across nodes).

Resume (`load_checkpoint`) works across layouts because the state dicts are DTensors keyed by single-device
names (`get_model_state_dict` / `get_optimizer_state_dict`): DCP reads, on each rank, the pieces of the saved
shards that overlap the rank's own shards, so a checkpoint of 2 ranks with --ep 2 resumes on 1 process, on
2 ranks with --ep 1, on 4, ... A one-device checkpoint (safetensors) resumes on N ranks too: the weights are
loaded before sharding, the moments read whole by every rank and sharded as they are set.
"""

from __future__ import annotations

import json
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..checkpoint import mtp_shared_copies, state_to_hf, write_config, write_weights
from ..config import ModelConfig
from ..durable import atomic_write_text, fsync_dir, mkdir, mkdtemp, replace_dir
from ..train.state import (
    STATE_JSON,
    STATE_TENSORS,
    checkpoint_path,
    check_model_config,
    prune_checkpoints,
)
from .parallelize import reshard

DCP_DIR = "dcp"
SHARDS_JSON = "trainer_state/shards.json"
FORMAT = "dcp"  # state.json's "format" for these checkpoints; a one-device checkpoint has none


class ShardError(ValueError):
    """A checkpoint's shard file is missing, truncated or corrupt: the message names the file and the ranks."""


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR).is_dir() or (ckpt / SHARDS_JSON).is_file()


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _writer_rank(name: str) -> int:
    return int(name.removeprefix("__").split("_")[0])  # DCP names each rank's files __{rank}_{n}.distcp


# ---- saving -----------------------------------------------------------------------------------------------
def _sharded_state(model, optimizer) -> dict[str, Any]:
    reshard(model)  # the root stays gathered after a forward with no backward (validation): shards by name
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
            # every rank drew the same numbers from the same seed: one copy (DCP keeps one of equal plain tensors)
            "rng": torch.get_rng_state()}


def save_checkpoint(run_dir: Path, model, optimizer, state: dict[str, Any], write_files: Callable[[Path], None],
                    keep: int, also_keep_up_to: int | None = None) -> Path:
    """Every rank: write checkpoint step-{state['step']} as DCP shards, atomically (module docstring).
    write_files(directory) writes rank 0's model config, tokenizer and run config; `state` (rank 0's) is the
    JSON trainer state. Then rank 0 prunes as one-device saves do. Raises on every rank if any rank failed."""
    rank, world = _rank_world()
    final = checkpoint_path(run_dir, state["step"])
    tmp = Path(_broadcast(str(mkdtemp(prefix=f".{final.name}.", dir=mkdir(final.parent))) if rank == 0 else None))
    try:
        # a failed write on any rank raises a CheckpointException on every rank, before any .metadata
        dcp.save(_sharded_state(model, optimizer), storage_writer=FileSystemWriter(tmp / DCP_DIR, sync_files=True))
        mine = {f.name: {"bytes": f.stat().st_size, "crc32": _crc32(f)}
                for f in sorted((tmp / DCP_DIR).glob(f"__{rank}_*.distcp"))}
        written = [None] * world
        dist.all_gather_object(written, mine)
        error = None
        if rank == 0:
            try:
                write_files(tmp)
                mkdir((tmp / STATE_JSON).parent)
                shards = {name: info for per_rank in written for name, info in per_rank.items()}
                atomic_write_text(tmp / SHARDS_JSON, json.dumps({"world_size": world, "files": shards}, indent=2))
                atomic_write_text(tmp / STATE_JSON, json.dumps(dict(state, format=FORMAT, world_size=world),
                                                               indent=2))
                fsync_dir(tmp / DCP_DIR)  # the shards' names before the rename that makes them a checkpoint
                replace_dir(tmp, final)
            except Exception as e:  # told to every rank below, so none waits on a rank that gave up
                error = f"{type(e).__name__}: {e}"
        error = _broadcast(error)
        if error is not None:
            raise RuntimeError(f"rank 0 could not complete checkpoint {final} ({error}); the checkpoints before it "
                               "are intact")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        prune_checkpoints(run_dir, keep, also_keep_up_to)
    return final


# ---- checking and loading ------------------------------------------------------------------------------------
def verify_shards(ckpt: Path) -> None:
    """Every .distcp file shards.json lists is there with its size and CRC-32, or a ShardError naming the file,
    the rank that wrote it and the rank that found it. The ranks split the files between them and agree on
    the result, so every rank raises the same error."""
    rank, world = _rank_world()
    try:
        manifest = json.loads((ckpt / SHARDS_JSON).read_text())
        files, saved_world = manifest["files"], manifest["world_size"]
    except (OSError, ValueError, KeyError) as e:
        raise ShardError(f"rank {rank}: checkpoint {str(ckpt)!r} has no readable {SHARDS_JSON} ({e}); resume from "
                         "an earlier checkpoint by deleting this directory") from e
    problems = []
    for name in sorted(files)[rank::world]:
        path, want = ckpt / DCP_DIR / name, files[name]
        if not path.is_file():
            found = "is missing"
        elif path.stat().st_size != want["bytes"]:
            found = f"has {path.stat().st_size} bytes, {want['bytes']} were written"
        elif _crc32(path) != want["crc32"]:
            found = "is corrupt (its CRC-32 differs from the one recorded when it was written)"
        else:
            continue
        problems.append(f"{path} {found} (written by rank {_writer_rank(name)} of {saved_world}; found by rank {rank})")
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, problems)
        problems = [p for per_rank in every for p in per_rank]
    if problems:
        raise ShardError(f"cannot resume from {str(ckpt)!r}: {'; '.join(problems)}. Resume from an earlier "
                         "checkpoint (`--resume step-NNNNNNN`) or delete this one")


def load_checkpoint(ckpt: Path, model, optimizer, model_cfg: ModelConfig) -> dict[str, Any]:
    """Restore the weights, AdamW moments and RNG of checkpoint `ckpt` into this process's (possibly sharded)
    model and optimizer, whatever layout wrote it; → the JSON trainer state. A one-device checkpoint's weights
    are already loaded (load_pretrained, before sharding): only its moments and RNG are read here."""
    check_model_config(ckpt, model_cfg)
    try:
        state = json.loads((ckpt / STATE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(ckpt)!r} is unreadable ({e}); resume from an earlier one by deleting "
                         "this directory") from e
    if state.pop("format", None) == FORMAT:
        state.pop("world_size", None)
        _load_sharded(ckpt, model, optimizer)
    else:
        _load_full(ckpt, model, optimizer)
    return state


def _load_sharded(ckpt: Path, model, optimizer) -> None:
    verify_shards(ckpt)
    reader = FileSystemReader(ckpt / DCP_DIR)
    saved = set(reader.read_metadata().state_dict_metadata)
    reshard(model)
    model_sd = get_model_state_dict(model)
    absent = sorted(k for k in model_sd if f"model.{k}" not in saved)
    if absent:  # the config matched: the checkpoint was written by another version of the model code
        shown = ", ".join(absent[:4]) + (", ..." if len(absent) > 4 else "")
        raise ValueError(f"checkpoint {str(ckpt)!r} lacks {len(absent)} of this model's tensors ({shown}); it "
                         "cannot be resumed by this model")
    # a fresh optimizer: this fills every parameter's moments (a step with zero gradients and rate), the tensors
    # DCP loads into. A parameter that had no gradient before the save had no moments: it gets none again
    groups = get_optimizer_state_dict(model, optimizer)
    moments = {name: st for name, st in groups["state"].items()
               if all(f"optim.state.{name}.{k}" in saved for k in st)}
    target = {"model": model_sd, "optim": {"state": moments}, "rng": torch.get_rng_state()}
    with warnings.catch_warnings():  # one process needs no group: DCP warns that it assumes so, even when told
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(target, storage_reader=reader, no_dist=not dist.is_initialized())
    set_model_state_dict(model, target["model"])
    # the param_groups stay this run's: a resume may change the learning rate, betas, weight decay (config.py)
    set_optimizer_state_dict(model, optimizer, {"state": target["optim"]["state"],
                                                "param_groups": groups["param_groups"]})
    torch.set_rng_state(target["rng"])


def _load_full(ckpt: Path, model, optimizer) -> None:
    """A one-device checkpoint's moments (full tensors, trainer_state/optimizer.safetensors) into this
    process's optimizer: every rank reads the whole file and keeps its own shards."""
    try:
        tensors = load_file(str(ckpt / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(ckpt)!r} is unreadable ({e}); resume from an earlier one by deleting "
                         "this directory") from e
    groups = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    moments = {name: {k: tensors[f"optim.{name}.{k}"] for k in st} for name, st in groups["state"].items()
               if f"optim.{name}.step" in tensors}
    set_optimizer_state_dict(model, optimizer, {"state": moments, "param_groups": groups["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(tensors["rng.torch"])


# ---- the final model --------------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def export_pretrained(model, path: Path | None, max_shard_size: int = 5 * 2**30) -> None:
    """Every rank: gather the sharded model one safetensors shard at a time and, on the rank given a `path`
    (rank 0), write it as a Hugging Face directory, what `load_pretrained`, `LLM` and transformers read
    (fp32 weights and config.json). At most one shard of full tensors is in memory at a time."""
    reshard(model)
    state = get_model_state_dict(model)  # DTensor shards, under the single-device names
    cfg = model.config
    groups: list[list[str]] = [[]]  # planned from the global shapes alone, so every rank plans alike
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if cfg.num_nextn_predict_layers:
        groups.append([])  # the MTP layers' copies of the embedding and head, gathered once more

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for i, names in enumerate(groups):
            if not names:
                names = ["model.embed_tokens.weight", "lm_head.weight"]
            # each full_tensor is a collective: every rank gathers the same tensors in the same order
            full = {n: _full(state[n]).detach().to("cpu") for n in names}
            if path is None:
                continue
            items = (mtp_shared_copies(full, cfg) if not groups[i] else state_to_hf(full, cfg, shared_copies=False))
            # own storage per tensor: safetensors refuses views of one tensor (the experts' rows)
            yield {k: t.contiguous().clone() for k, t in items}

    if path is None:
        for _ in shards():
            pass
        return
    write_weights(mkdir(path), shards())
    write_config(cfg, path, torch.float32)
