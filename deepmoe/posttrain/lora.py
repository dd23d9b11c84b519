"""LoRA fine-tuning (`deepmoe sft --lora-rank R`): what changes in an SFT run when an adapter trains instead
of the model.

The base (cfg.model) is loaded and frozen, adapters go on the targeted layers (deepmoe.lora), and only
their factors require grad, so gradients, AdamW state and checkpoints cover the adapter alone. The base
never changes, its routers' balancing bias included: that bias is a buffer the aux-loss-free step moves
after every optimizer step, and an adapter is only separable from its base if the base it was trained on
is the one on disk. `LLM(base, adapter=...)`, `deepmoe merge` and peft all apply the adapter to the
base's own bias, so a moved bias would make every one of them serve a different model from the trained
one. A LoRA run therefore has bias_update_rate 0 (SFTConfig refuses anything else); the router weights
stay frozen unless `gate` is targeted. The sequence-wise balance loss and the MTP loss still apply: their
gradients reach the adapters (MTP modules are never adapted, so the MTP loss keeps the frozen MTP layer's
drafts landing on the tuned model).

    RUN/checkpoints/step-N/  adapter/ (peft layout), tokenizer, sft_config.json, trainer_state/ (train.state)
    RUN/adapter/             the trained adapter; base_model_name_or_path is the base's absolute path
    RUN/final/               base + adapter merged (deepmoe merge's streaming merge, in the base's dtype),
                             with the run's tokenizer and sft_config.json: a full model directory
A resume loads the base from cfg.model, puts the same adapters on it, loads the checkpoint's factors into
them (load_adapter) and the optimizer state by parameter name (load_trainer_state).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..durable import mkdtemp, replace_dir
from ..lora import LoraConfig, LoraReport, apply_lora, load_adapter, merge_adapter, save_adapter
from ..model import DeepSeekModel
from ..tokenizer import Tokenizer
from ..train.state import write_run_files

ADAPTER = "adapter"  # in a checkpoint and in the run directory


def plan_lora(model_cfg: ModelConfig, lora: LoraConfig, base: str | None) -> LoraReport:
    """What the adapter will be on this model, from its config alone (a meta-device skeleton: nothing is
    allocated): a target that matches no layer fails here, before data and weights are loaded."""
    if model_cfg.extra.get("quantization_config"):
        raise ValueError(f"{base} holds quantized (FP8) weights; a LoRA run merges its adapter into the base "
                         f"checkpoint, so convert it first: deepmoe convert {base} BASE-bf16")
    with torch.device("meta"):
        skeleton = DeepSeekModel(model_cfg)
    return apply_lora(skeleton, lora)


def add_adapter(model: DeepSeekModel, lora: LoraConfig, seed: int, ckpt: Path | None) -> LoraReport:
    """Freeze `model` (the base) and put the run's adapters on it: fresh (A drawn from `seed` with its own
    generator, so the data order and dropout draws do not shift; B zero, so the run starts at the base's
    outputs exactly), then on resume the factors of checkpoint `ckpt`."""
    report = apply_lora(model, lora, seed=seed)
    if ckpt is not None:
        report = load_adapter(model, ckpt / ADAPTER)
    return report


def write_adapter_checkpoint(path: Path, model: DeepSeekModel, tokenizer: Tokenizer, cfg: Any,
                             config_name: str) -> None:
    """A checkpoint's model part under LoRA (a train.state.ModelWriter): the adapter, not the frozen base."""
    save_adapter(model, path / ADAPTER, base_model_path=cfg.model)
    write_run_files(path, tokenizer, cfg, config_name)


def write_lora_final(run_dir: Path, model: DeepSeekModel, tokenizer: Tokenizer, cfg: Any) -> Path:
    """RUN/adapter, then RUN/final = base + adapter merged from the files (streamed: no second copy of the
    model in memory), each moved into place whole. Returns RUN/final."""
    adapter, final = run_dir / ADAPTER, run_dir / "final"
    save_adapter(model, adapter, base_model_path=cfg.model)
    tmp = mkdtemp(prefix=".final.", dir=run_dir)
    try:
        merged = tmp / "model"  # merge_adapter builds its own temp directory beside this one, inside tmp
        merge_adapter(adapter, merged, base=cfg.model)
        # the run's tokenizer may carry a chat template the base lacked: serve what was trained on
        write_run_files(merged, tokenizer, cfg, cfg.FILE)
        replace_dir(merged, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
