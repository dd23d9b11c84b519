"""Adapter directories in peft's layout: adapter_config.json + adapter_model.safetensors.

Keys and shapes are the ones peft gives the same adapter on transformers' DeepseekV2/V3 model, so peft
loads our files onto transformers and we load peft's:
  - a linear layer P: `base_model.model.P.lora_A.weight` (r, in) and `.lora_B.weight` (out, r);
  - the embedding: `base_model.model.model.embed_tokens.lora_embedding_A` (r, vocab) and
    `.lora_embedding_B` (d, r), no `.weight` suffix (peft keeps them as bare parameters);
  - the routed experts P (transformers' stacked `gate_up_proj` (E, 2·inter, d) and `down_proj` (E, d, inter)),
    one peft `ParamWrapper` per targeted parameter, nested in registration order, so with both targeted
    gate_up_proj's factors sit under `P.base_layer.lora_*` and down_proj's under `P.lora_*` (with one, under
    `P.lora_*`); lora_A (E·r, in) holds expert e's A in rows e·r .. e·r+r-1, lora_B (out, r·E) holds its B in
    columns j·E + e (peft reshapes them as (E, r, in) and (out, r, E)).
The dense MLP and shared-expert layers (gate_proj, up_proj, down_proj) are written as parameter targets
(`P.weight`): peft on transformers 5 rewrites *module* targets of those names into the fused expert
parameters (its v4 → v5 MoE conversion) and would drop them. Same keys, same shapes, either way. Routers
(`mlp.gate`, not an nn.Linear in transformers) are parameter targets too, as peft's "all-linear" makes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..durable import atomic_write_text, fsync_file, mkdir, mkdtemp, replace_dir
from .apply import OUTSIDE_STACK, LoraReport, Plan, lora_layers, lora_report, resolve_plan, wrap
from .layers import LoraEmbedding, LoraLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MOE_RENAMED = ("gate_proj", "up_proj", "down_proj")  # module targets peft's MoE conversion would take away
# peft options with no counterpart here: loading an adapter that uses one would silently compute something else
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
                "layers_to_transform": None, "exclude_modules": None, "trainable_token_indices": None,
                "alora_invocation_tokens": None}


class AdapterError(ValueError):
    """An adapter directory that cannot be read, or that does not fit this model."""


# ---- layout --------------------------------------------------------------------------------------
def _layout(model: nn.Module, plan: Plan) -> dict[str, tuple[str, str, str, tuple[int, ...]]]:
    """peft key → (path, projection, "A" or "B", shape in the file) for every tensor of `plan`."""
    out = {}
    for path, projs in plan.items():
        layer = _base(model, path)
        if isinstance(layer, nn.Embedding):
            r, (v, d) = projs["weight"][0], layer.weight.shape
            out[f"{PREFIX}{path}.lora_embedding_A"] = (path, "weight", "A", (r, v))
            out[f"{PREFIX}{path}.lora_embedding_B"] = (path, "weight", "B", (d, r))
            continue
        if "weight" in projs:  # a linear layer or a router
            r, (o, i) = projs["weight"][0], layer.weight.shape
            out[f"{PREFIX}{path}.lora_A.weight"] = (path, "weight", "A", (r, i))
            out[f"{PREFIX}{path}.lora_B.weight"] = (path, "weight", "B", (o, r))
            continue
        E, inter, d = layer.gate_proj.shape
        shapes = {"gate_up_proj": (2 * inter, d), "down_proj": (d, inter)}
        wrapped = [p for p in ("gate_up_proj", "down_proj") if p in projs]  # innermost first
        for depth, proj in enumerate(wrapped):
            where = path + ".base_layer" * (len(wrapped) - 1 - depth)
            r, (o, i) = projs[proj][0], shapes[proj]
            out[f"{PREFIX}{where}.lora_A.weight"] = (path, proj, "A", (E * r, i))
            out[f"{PREFIX}{where}.lora_B.weight"] = (path, proj, "B", (o, r * E))
    return out


def _to_file(t: torch.Tensor, proj: str, which: str) -> torch.Tensor:
    """Our factor → peft's: experts' A (E, r, in) → (E·r, in), B (E, out, r) → (out, r·E); others as they are."""
    if proj == "weight":
        return t
    if which == "A":
        return t.reshape(-1, t.shape[-1])
    return t.permute(1, 2, 0).reshape(t.shape[1], -1)


def _from_file(t: torch.Tensor, proj: str, which: str, n_experts: int) -> torch.Tensor:
    """The inverse of _to_file (peft's own reshape of its flat expert factors)."""
    if proj == "weight":
        return t
    if which == "A":
        return t.reshape(n_experts, -1, t.shape[-1])
    return t.reshape(t.shape[0], -1, n_experts).permute(2, 0, 1)


def current_plan(model: nn.Module) -> tuple[Plan, float]:
    """The plan of the adapters on `model`, and their dropout."""
    plan: Plan = {}
    dropout = 0.0
    for path, layer in lora_layers(model):
        if isinstance(layer, (LoraLinear, LoraEmbedding)):
            plan[path] = {"weight": (layer.rank, layer.alpha)}
            dropout = max(dropout, getattr(getattr(layer, "dropout", None), "p", 0.0))  # routers, embedding: none
        else:
            plan[path] = {proj: (pair.rank, pair.alpha) for proj, pair in
                          (("gate_up_proj", layer.gate_up), ("down_proj", layer.down)) if pair is not None}
    return plan, dropout


def _factor(model: nn.Module, path: str, proj: str, which: str) -> nn.Parameter:
    layer = model.get_submodule(path)
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A if which == "A" else layer.lora_embedding_B
    owner = layer if isinstance(layer, LoraLinear) else layer.gate_up if proj == "gate_up_proj" else layer.down
    return owner.lora_A if which == "A" else owner.lora_B


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _config(plan: Plan, dropout: float, base_model_path) -> dict:
    entries = []  # (peft list, name, rank, alpha)
    for path, projs in plan.items():
        for proj, (r, a) in projs.items():
            if proj != "weight":
                entries.append(("target_parameters", f"{path}.{proj}", r, a))
            elif path.rsplit(".", 1)[-1] in (*_MOE_RENAMED, "gate"):  # a router is no nn.Linear to peft
                entries.append(("target_parameters", f"{path}.weight", r, a))
            else:
                entries.append(("target_modules", path, r, a))
    (r0, a0), _ = Counter((r, a) for *_, r, a in entries).most_common(1)[0]
    lists = {name: [n for kind, n, *_ in entries if kind == name] or None
             for name in ("target_modules", "target_parameters")}
    if base_model_path is not None and Path(base_model_path).is_dir():
        base_model_path = str(Path(base_model_path).resolve())
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
        "r": r0, "lora_alpha": _number(a0),
        # dropout acts only in training; peft refuses any on parameter targets, even just to load the file
        "lora_dropout": 0.0 if lists["target_parameters"] else dropout,
        **lists,
        "rank_pattern": {re.escape(n): r for _, n, r, _ in entries if r != r0},
        "alpha_pattern": {re.escape(n): _number(a) for _, n, _, a in entries if a != a0},
        "bias": "none", "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        **_UNSUPPORTED,
    }


# ---- writing -------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_path: str | os.PathLike | None = None
                 ) -> None:
    """Write the adapters on `model` as a peft adapter directory, replacing `path` whole and atomically.
    base_model_path (recorded in the config) is where `deepmoe merge` finds the base by default."""
    plan, dropout = current_plan(model)
    if not plan:
        raise AdapterError("the model carries no LoRA adapters to save (apply_lora or load_adapter first)")
    tensors = {key: _to_file(_factor(model, p, proj, which).detach(), proj, which).to("cpu").contiguous().clone()
               for key, (p, proj, which, _) in _layout(model, plan).items()}  # own storage: safetensors wants it
    path = Path(path)
    tmp = mkdtemp(f".{path.name}.", mkdir(path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        fsync_file(tmp / WEIGHTS_NAME)  # on disk before the directory that names it is moved into place
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(_config(plan, dropout, base_model_path), indent=2))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading -------------------------------------------------------------------------------------
def read_adapter_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{path} has no {CONFIG_NAME}; expected a peft LoRA adapter directory")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{file}: a {cfg['peft_type']} adapter; deepmoe loads LoRA adapters only")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise AdapterError(f"{file}: 'r' (the LoRA rank) must be a positive integer, got {cfg.get('r')!r}")
    for key, plain in _UNSUPPORTED.items():
        if cfg.get(key) not in (plain, None, [], {}):
            raise AdapterError(f"{file}: {key} = {cfg[key]!r} is not supported by deepmoe's LoRA "
                               f"(merge the adapter with peft and load the merged model instead)")
    return cfg


def adapter_plan(model: nn.Module, cfg: dict, where: str = "adapter") -> Plan:
    """The layers, ranks and alphas an adapter config asks for, on this model (peft's matching rules)."""
    try:
        plan = resolve_plan(model, cfg.get("target_modules"), cfg.get("target_parameters"), cfg["r"],
                            cfg.get("lora_alpha", 8), cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None
    if cfg.get("use_rslora"):  # scale alpha/√r instead of alpha/r: the same update with alpha·√r
        plan = {p: {k: (r, a * r ** 0.5) for k, (r, a) in projs.items()} for p, projs in plan.items()}
    return plan


def read_adapter_tensors(model: nn.Module, path: str | os.PathLike, plan: Plan
                         ) -> dict[tuple[str, str, str], torch.Tensor]:
    """(path, projection, "A"/"B") → factor in our layout, every key and shape checked against `plan`.
    (path, "weight", "base") → the base weight of the embedding or head where the file carries one: peft
    saves those of targeted embedding layers (by default, in case the vocabulary was resized), and loading
    puts them in place of the base's, so they are part of the adapted model."""
    path = Path(path)
    file = path / WEIGHTS_NAME
    if not file.is_file():
        hint = " (adapter_model.bin: pickled weights are not read; save with safetensors)" if (
            path / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{path} has no {WEIGHTS_NAME}{hint}")
    layout = _layout(model, plan)
    for p in OUTSIDE_STACK:  # optional: peft also saves a targeted embedding's or head's base weight
        if p in plan:
            layout[f"{PREFIX}{p}.base_layer.weight"] = (p, "weight", "base", tuple(_base(model, p).weight.shape))
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for a truncated or corrupt header
        raise AdapterError(f"{file}: cannot read safetensors file ({e})") from None
    keys = set(handle.keys())
    missing = sorted(k for k, v in layout.items() if k not in keys and v[2] != "base")
    extra = sorted(keys - layout.keys())
    if missing or extra:
        raise AdapterError(f"{file} does not match its config on this model: "
                           + "; ".join(f"{what} {len(ks)} key(s), e.g. {ks[0]}"
                                       for what, ks in (("missing", missing), ("unexpected", extra)) if ks))
    out = {}
    for key, (p, proj, which, shape) in layout.items():
        if key not in keys:
            continue
        t = handle.get_tensor(key)
        if tuple(t.shape) != shape:
            raise AdapterError(f"{file}: {key} has shape {list(t.shape)}, this model expects {list(shape)} "
                               f"(an adapter for another base model?)")
        n_experts = 0 if proj == "weight" else _base(model, p).gate_proj.shape[0]
        out[(p, proj, which)] = _from_file(t, proj, which, n_experts)
    return out


def _base(model: nn.Module, path: str) -> nn.Module:
    layer = model.get_submodule(path)
    return getattr(layer, "base_layer", layer)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoraReport:
    """Put the adapter in `path` on `model`: freeze the model and wrap the layers the adapter names, or, if
    the model already carries the same adapters (apply_lora with the same targets and ranks, e.g. when
    resuming a run), load into those. Every key and shape is checked before anything changes."""
    cfg = read_adapter_config(path)
    plan = adapter_plan(model, cfg, str(path))
    factors = read_adapter_tensors(model, path, plan)
    existing, _ = current_plan(model)
    if existing and existing != plan:
        raise AdapterError(f"the model already carries adapters that differ from {path}'s (layers or ranks); "
                           f"load into a model without adapters")
    if not existing:
        wrap(model, plan, float(cfg.get("lora_dropout") or 0.0))
    with torch.no_grad():
        for (p, proj, which), t in factors.items():
            target = _base(model, p).weight if which == "base" else _factor(model, p, proj, which)
            target.copy_(t)
    return lora_report(model)
