"""`deepmoe merge`: a base checkpoint plus a LoRA adapter → a full checkpoint with the update folded in.

Streamed tensor by tensor like `deepmoe convert`, without building the model, so memory stays near one
shard plus the adapter whatever the checkpoint's size. Each adapted weight becomes W + (α/r)·B·A, summed
in fp32 and rounded once to the checkpoint's dtype; every other tensor (the MTP layers included) is copied
unchanged. The result is written into a hidden directory beside OUT and moved into place whole, so OUT is
never a half-merged model, even after a crash.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import (CheckpointError, SafetensorsFiles, _fp8_block, _key_files, _read_config, by_shard,
                          write_weights)
from ..convert import SIDE_FILES, copy_side_files
from ..durable import mkdir, mkdtemp, replace_dir
from ..model import DeepSeekModel
from .adapter import CONFIG_NAME, AdapterError, adapter_plan, read_adapter_config, read_adapter_tensors
from .apply import OUTSIDE_STACK, Plan


def _is_mtp_copy(key: str) -> bool:
    return key.endswith((".embed_tokens.weight", ".shared_head.head.weight")) and key.startswith("model.layers.")


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None,
                  max_shard_size: int = 5 * 2**30) -> dict:
    """Write base + adapter as a full model directory `out` (config and tokenizer files copied from the base).
    base: the base model directory; by default the adapter's base_model_name_or_path."""
    adapter, out = Path(adapter), Path(out)
    cfg = read_adapter_config(adapter)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter / CONFIG_NAME} names no base model (base_model_name_or_path): "
                           f"pass the base model directory (deepmoe merge --model DIR)")
    base = Path(base)
    model_cfg = _read_config(base)
    if _fp8_block(model_cfg) is not None:
        raise CheckpointError(f"{base} holds FP8 block weights; convert it first (deepmoe convert {base} "
                              f"BASE-bf16) and merge into that")
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise ValueError("merge writes a new model directory; choose an output other than the base or the adapter")
    with torch.device("meta"):  # the layer structure and shapes, nothing allocated
        skeleton = DeepSeekModel(model_cfg)
    plan = adapter_plan(skeleton, cfg, str(adapter))
    deltas = _deltas(plan, read_adapter_tensors(skeleton, adapter, plan), model_cfg.num_hidden_layers,
                     model_cfg.num_nextn_predict_layers)
    files = SafetensorsFiles()
    key_files = _key_files(base, files)
    deltas = {k: f for k, f in deltas.items() if k in key_files or not _is_mtp_copy(k)}  # MTP: may be absent
    missing = sorted(deltas.keys() - key_files.keys())
    if missing:
        raise CheckpointError(f"{base} lacks {len(missing)} weight(s) the adapter changes, e.g. {missing[0]}")

    def tensors():  # streamed: one shard's tensors in memory at a time
        for key in sorted(key_files):
            t = files.read(key_files, key)
            yield key, (deltas[key](t) if key in deltas else t)

    tmp = mkdtemp(f".{out.name}.", mkdir(out.parent.resolve()))
    try:
        n = write_weights(tmp, by_shard(tensors(), max_shard_size))
        copy_side_files(base, tmp, ("config.json", *SIDE_FILES))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": len(key_files), "merged": len(deltas), "shards": n, "base": str(base)}


def _deltas(plan: Plan, factors: dict[tuple[str, str, str], torch.Tensor], n_layers: int, n_mtp: int
            ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Checkpoint key → a function of its tensor giving the merged tensor, (α/r)·B·A computed when the tensor
    streams by (all of them at once would be another copy of every adapted weight)."""
    out = {}
    for path, projs in plan.items():
        for proj, (r, alpha) in projs.items():
            a, b = factors[(path, proj, "A")], factors[(path, proj, "B")]
            scale = alpha / r
            if proj == "weight" and path in OUTSIDE_STACK:
                # the checkpoint also holds a copy of the embedding and of the head for each MTP layer, which
                # must stay equal to the main ones; peft may have saved the weight itself, which replaces the base's
                fn = partial(_merged, a, b, scale, path == "model.embed_tokens", factors.get((path, proj, "base")))
                out[f"{path}.weight"] = fn
                copy = "embed_tokens" if path == "model.embed_tokens" else "shared_head.head"
                for j in range(n_layers, n_layers + n_mtp):
                    out[f"model.layers.{j}.{copy}.weight"] = fn
                continue
            if proj == "weight":
                out[f"{path}.weight"] = partial(_merged, a, b, scale, False, None)
                continue
            half = b.shape[1] // 2  # gate_up_proj's output rows: gate, then up
            parts = ({"down_proj": slice(None)} if proj == "down_proj"
                     else {"gate_proj": slice(0, half), "up_proj": slice(half, None)})
            for e in range(a.shape[0]):  # the checkpoint stores one matrix per expert
                for name, rows in parts.items():
                    out[f"{path}.{e}.{name}.weight"] = partial(_merged, a[e], b[e, rows], scale, False, None)
    return out


def _merged(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool, replace: torch.Tensor | None,
            w: torch.Tensor) -> torch.Tensor:
    """w + (α/r)·B·A (transposed for an embedding: (B·A)ᵀ is (vocab, d)), summed in fp32 and rounded once
    to w's dtype; `replace`, if given, stands in for w."""
    d = scale * (b.float() @ a.float())
    return ((w if replace is None else replace).float() + (d.t() if transpose else d)).to(w.dtype)
