"""Training checkpoints: a complete Hugging Face model directory plus everything needed to resume.

    RUN/checkpoints/step-0000500/
        config.json, model.safetensors, tokenizer.json, ...   the model, loadable by deepmoe and transformers
        train_config.json                                     the run's resolved TrainConfig
        trainer_state/optimizer.safetensors                   AdamW moments and step per parameter, RNG state
        trainer_state/state.json                              step, tokens, counters, data-sampler position
A LoRA run's checkpoint holds its adapter (`adapter/`, peft's layout) instead of the model: the base it
applies to is the run's unchanged starting model (see deepmoe.posttrain.lora).
A checkpoint is built in a hidden temp directory, every file and directory in it fsynced, and moved into
place in one step (`deepmoe.durable.replace_dir`), so a crash or power loss at any moment leaves every
existing checkpoint intact and never a half-written one under a step-* name; what such a crash does leave,
the hidden temp directory, is removed when the run next starts (`remove_interrupted_saves`). No pickle:
tensors are safetensors, the rest JSON. The pretraining loop writes the same files from a snapshot in host
memory on a background thread (deepmoe.train.async_checkpoint); post-training saves here, in its loop. A run
on several processes writes sharded checkpoints under the same names and rules (deepmoe.parallel.checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save_pretrained, write_config
from ..config import ModelConfig
from ..durable import atomic_write, atomic_write_text, mkdir, mkdtemp, recover_dir, remove_dir, replace_dir
from ..model import DeepSeekModel
from ..tokenizer import Tokenizer
from .config import TrainConfig

log = logging.getLogger("deepmoe")

CHECKPOINTS = "checkpoints"
TRAIN_CONFIG = "train_config.json"
# in a subdirectory, so the checkpoint's top level stays a plain model directory (every *.safetensors
# there is read as model weights)
STATE_JSON = "trainer_state/state.json"
STATE_TENSORS = "trainer_state/optimizer.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# what an interrupted writer leaves: mkdtemp's directories (8 random characters) for a checkpoint or final/,
# remove_dir's `.NAME.deleting`, and write_temp's files `.NAME.XXXXXXXX.tmp`. Not `.NAME.old`: that is the
# only complete copy while a replace_dir is cut between its renames (recover_dir puts it back).
_TEMP_CHECKPOINT = re.compile(r"^\.step-\d+\.([a-z0-9_]{8}|deleting)$")
_TEMP_RUN_DIR = re.compile(r"^\.final\.[a-z0-9_]{8}$")
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "step")


# writes a checkpoint's model part into a directory: (path, model, tokenizer, cfg, config_name)
ModelWriter = Callable[[Path, DeepSeekModel, Tokenizer, Any, str], None]


def write_model_dir(path: Path, model: DeepSeekModel, tokenizer: Tokenizer, cfg: TrainConfig,
                    config_name: str = TRAIN_CONFIG) -> None:
    """What `deepmoe.load_pretrained`, `deepmoe generate` and serving read: weights in fp32 (the master
    copy, so a resume is exact), config, tokenizer, and the run's config (for pretraining the
    train_config.json `deepmoe eval` reads; fine-tuning runs save theirs under their own name)."""
    save_pretrained(model, path)
    write_run_files(path, tokenizer, cfg, config_name)


def write_run_files(path: Path, tokenizer: Tokenizer, cfg: Any, config_name: str = TRAIN_CONFIG) -> None:
    """The tokenizer and the run's config, beside whatever form the weights take (a model or an adapter)."""
    tokenizer.save(path)
    atomic_write_text(path / config_name, json.dumps(cfg.to_dict(), indent=2))


def write_checkpoint_files(path: Path, model_cfg: ModelConfig, tokenizer: Tokenizer, cfg: TrainConfig) -> None:
    """A checkpoint's files besides the weights, for a writer that stores the weights in another form (a
    distributed run's shards, deepmoe.parallel.checkpoint): the model config, tokenizer and run config."""
    write_config(model_cfg, path, torch.float32)  # the weights are fp32 master copies, as write_model_dir's
    write_run_files(path, tokenizer, cfg)


def save_checkpoint(run_dir: Path, model: DeepSeekModel, tokenizer: Tokenizer, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, state: dict[str, Any], also_keep_up_to: int | None = None,
                    config_name: str = TRAIN_CONFIG, write_model: ModelWriter = write_model_dir) -> Path:
    """Write checkpoint `step-{state['step']}` now, from the live model and optimizer (`write_checkpoint`).
    `write_model` writes the model part (a LoRA run writes its adapter: the base cannot change). The
    pretraining loop's background writer is deepmoe.train.async_checkpoint."""
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in optimizer_tensors(model, optimizer).items()}
    return write_checkpoint(run_dir, state, lambda tmp: write_model(tmp, model, tokenizer, cfg, config_name),
                            tensors | rng_tensors(), cfg.keep_checkpoints, also_keep_up_to)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:07d}"


def write_checkpoint(run_dir: Path, state: dict[str, Any], write_model: Callable[[Path], None],
                     tensors: dict[str, torch.Tensor], keep: int, also_keep_up_to: int | None = None) -> Path:
    """Write checkpoint `step-{state['step']}` atomically: write_model(directory) fills in the model part,
    `tensors` (CPU: optimizer moments and steps, RNG state) and `state` make trainer_state/. Then drop all
    but the newest `keep` and the newest at or before step `also_keep_up_to` (while the run is blowing up:
    the one to resume from)."""
    final = checkpoint_path(run_dir, state["step"])
    tmp = mkdtemp(prefix=f".{final.name}.", dir=mkdir(final.parent))
    try:
        write_model(tmp)
        mkdir((tmp / STATE_JSON).parent)
        atomic_write(tmp / STATE_TENSORS, lambda path: save_file(tensors, path))
        atomic_write_text(tmp / STATE_JSON, json.dumps(state, indent=2))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep, also_keep_up_to)
    return final


def prune_checkpoints(run_dir: Path, keep: int, also_keep_up_to: int | None = None) -> None:
    """Drop all but the newest `keep` checkpoints and the newest at or before step `also_keep_up_to`."""
    checkpoints = list_checkpoints(run_dir)
    sound = [c for c in checkpoints if also_keep_up_to is not None and checkpoint_step(c) <= also_keep_up_to]
    for old in checkpoints[:-keep]:
        if not sound or old != sound[-1]:
            remove_dir(old)


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp directories of interrupted saves are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    for side in root.glob(".step-*.old"):  # a replacement of step-N cut between its two renames
        recover_dir(root / side.name.removeprefix(".").removesuffix(".old"))
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_JSON).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(run_dir: Path, which: str | Path) -> Path:
    """The complete checkpoint of this run named `which`: `step-0000020` or its path."""
    checkpoints = list_checkpoints(run_dir)
    which = Path(which)
    for c in checkpoints:
        if which.name == c.name and (len(which.parts) == 1 or which.resolve() == c.resolve()):
            return c
    have = ", ".join(c.name for c in checkpoints) or "none"
    raise ValueError(f"{str(which)!r} is not a complete checkpoint of the run in {str(run_dir)!r} "
                     f"(its checkpoints: {have})")


def remove_interrupted_saves(run_dir: Path) -> list[Path]:
    """Delete the temp directories and files that saves cut short by a crash left in `run_dir` (only ours,
    by their names); return what was removed."""
    found = []
    for folder, dir_pattern in ((run_dir, _TEMP_RUN_DIR), (run_dir / CHECKPOINTS, _TEMP_CHECKPOINT)):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if (dir_pattern.match(p.name) and p.is_dir())
                      or (_TEMP_FILE.match(p.name) and p.is_file())]
    found.sort()
    size = sum(f.stat().st_size for p in found for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    for p in found:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    if found:
        log.info("removed what %d interrupted save(s) left in %s (%.1f MB): %s", len(found), run_dir, size / 1e6,
                 ", ".join(str(p.relative_to(run_dir)) for p in found))
    return found


def check_model_config(ckpt: Path, model_cfg: ModelConfig) -> None:
    """A ValueError naming the fields where the model saved in `ckpt` differs from `model_cfg`, the model this
    run builds: its weights and optimizer state would not fit (or, worse, fit and mean something else)."""
    try:
        saved = ModelConfig.from_json(ckpt / "config.json")
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(ckpt)!r} has no readable model config ({e}); resume from an earlier "
                         "one by deleting this directory") from e
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "extra"]
    diff = [f"{n}: {getattr(saved, n)!r} saved, {getattr(model_cfg, n)!r} now" for n in names
            if getattr(saved, n) != getattr(model_cfg, n)]
    if diff:
        raise ValueError(f"cannot resume from {str(ckpt)!r}: it holds a model with another config than this run "
                         f"builds ({'; '.join(diff)}). Resume with the run's own model config (the --config or "
                         "--preset in its train_config.json, unchanged), or start a new run in another --out")


def load_trainer_state(ckpt: Path, model: DeepSeekModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer moments and RNG from `ckpt` (the weights are loaded by load_pretrained, a LoRA
    run's adapter by load_adapter) and return the JSON state."""
    try:
        state = json.loads((ckpt / STATE_JSON).read_text())
        tensors = load_file(str(ckpt / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(ckpt)!r} is unreadable ({e}); resume from an earlier one by "
                         "deleting this directory") from e
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    opt_state = {}
    for name, p in model.named_parameters():
        if id(p) not in index or f"optim.{name}.step" not in tensors:
            continue  # a parameter that never got a gradient has no optimizer state yet
        opt_state[index[id(p)]] = {k: tensors[f"optim.{name}.{k}"] for k in _OPTIM_KEYS}
    sd = optimizer.state_dict()
    sd["state"] = opt_state
    optimizer.load_state_dict(sd)  # moves moments to the parameters' device, step where AdamW wants it
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))
    return state


def optimizer_tensors(model: DeepSeekModel, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state by checkpoint key, the live tensors (optimizer.step() changes
    them in place): copy them before training goes on."""
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if st:
            for k in _OPTIM_KEYS:
                out[f"optim.{name}.{k}"] = st[k].detach()
    return out


def rng_tensors() -> dict[str, torch.Tensor]:
    """Fresh CPU copies of the RNG states."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out
