"""Putting LoRA on a built model, taking it off again, and counting what trains.

Targets are matched the way peft matches them, so a name means the same here, on the command line and
in an adapter_config.json:
  - module targets name nn.Linear layers: a target matches the layer whose path equals it or ends in
    "." + target (`o_proj`, `self_attn.kv_b_proj`, `layers.3.mlp.down_proj`); "all-linear" is every one;
  - parameter targets name weights: `P.weight` of a linear layer P, and `P.gate_up_proj` / `P.down_proj`
    of the stacked routed experts P (transformers' names: gate and up are one fused parameter there), and
    `P.weight` of a router P (`mlp.gate`).
On the command line one list holds both: a name that mentions `experts` or `gate_up_proj` is a parameter
target, and `experts` alone means both expert projections; `gate` is the routers. So a bare `down_proj`
is the dense and shared-expert layers, never the routed experts: those, and the routers, are opt-in.

Beyond the decoder stack (model.layers.*), the token embedding and the output head can be named
(`embed_tokens`, `lm_head`), as peft allows; "all-linear" leaves the head out, as peft's does. They are
worth their few parameters when the fine-tuning data uses tokens the base barely learned: the update
gives every token its own r-vector. The MTP modules read the same embedding and head, so they see the
adapted ones; their own layers are never adapted (transformers' model has no MTP modules for an adapter
to name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.experts import Experts
from ..model.router import Gate
from .layers import LoraEmbedding, LoraExperts, LoraLinear, LoraRouter

ALL_LINEAR = "all-linear"
OUTSIDE_STACK = ("model.embed_tokens", "lm_head")  # adaptable when named, never by all-linear
EXPERT_PARAMS = ("gate_up_proj", "down_proj")

LORA_MODULES = (LoraLinear, LoraEmbedding, LoraExperts)

# path → {projection: (rank, alpha)}; the projection is "weight" for a linear layer or a router, else one of
# EXPERT_PARAMS for the routed experts
Plan = dict[str, dict[str, tuple[int, float]]]


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float | None = None  # the update is scaled by alpha / rank; None: 2 · rank (a scale of 2 at any rank)
    targets: tuple[str, ...] = (ALL_LINEAR,)
    dropout: float = 0.0  # on the input of each linear layer's A; routers and routed experts have none

    def __post_init__(self):
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets  # as a CLI gives it
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets if t.strip()))
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.0 * self.rank)
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("no LoRA targets given; e.g. all-linear, or q_a_proj,kv_b_proj,o_proj,experts")

    def peft_targets(self) -> tuple[list[str], list[str]]:
        """(module targets, parameter targets), in peft's two lists."""
        modules, params = [], []
        for t in self.targets:
            parts = t.split(".")
            if parts[-1] == "experts":
                params += [f"{t}.{p}" for p in EXPERT_PARAMS]
            elif parts[-1] == "gate":
                params.append(f"{t}.weight")
            elif "experts" in parts[:-1] or parts[-1] == "gate_up_proj":
                params.append(t)
            else:
                modules.append(t)
        return modules, params


@dataclass
class LoraReport:
    """Trainable (adapter) parameters against everything the model holds, by kind of layer."""
    trainable: int
    total: int
    by_kind: dict[str, int] = field(default_factory=dict)
    layers: int = 0

    @property
    def fraction(self) -> float:
        return self.trainable / self.total

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {n:,}" for k, n in self.by_kind.items())
        return (f"LoRA on {self.layers} layers: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({100 * self.fraction:.2f}%): {kinds}")


# ---- matching ------------------------------------------------------------------------------------
def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every adaptable layer, wrapped or not: the main stack's, then the embedding and head."""
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, (nn.Linear, Experts, Gate)) and not name.endswith(".base_layer"):
            yield name, module
        elif isinstance(module, (LoraLinear, LoraExperts)):  # a LoraRouter is a LoraLinear
            yield name, module.base_layer
    for name in OUTSIDE_STACK:
        module = model.get_submodule(name)
        yield name, getattr(module, "base_layer", module)


def _param_names(path: str, layer: nn.Module) -> list[tuple[str, str]]:
    """(projection, parameter name as peft matches it) of a layer."""
    if isinstance(layer, Experts):
        return [(p, f"{path}.{p}") for p in EXPERT_PARAMS]
    return [("weight", f"{path}.weight")]


def resolve_plan(model: nn.Module, modules: str | Iterable[str] | None, params: Iterable[str] | None,
                 rank: int, alpha: float, rank_pattern: dict[str, int] | None = None,
                 alpha_pattern: dict[str, float] | None = None) -> Plan:
    """What to adapt, with each projection's rank and alpha, from peft-style targets: `modules` a list (or a
    regex string that must match a whole path, or "all-linear"), `params` a list; rank_pattern/alpha_pattern
    map regexes on a target's name (path for a module target, parameter name for a parameter target) to
    its own rank/alpha. Every target listed must match something."""
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    params = list(params or [])
    if isinstance(modules, str) and modules != ALL_LINEAR:
        regex, module_list = re.compile(modules), []
    else:
        regex, module_list = None, ([modules] if modules == ALL_LINEAR else list(modules or []))
    used: set[str] = set()
    plan: Plan = {}

    def add(path: str, proj: str, key: str) -> None:
        r = next((v for p, v in rank_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), rank)
        a = next((v for p, v in alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), alpha)
        plan.setdefault(path, {})[proj] = (int(r), float(a))

    for path, layer in _candidates(model):
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            hit = [t for t in module_list if (t == ALL_LINEAR and path not in OUTSIDE_STACK) or _matches(path, t)]
            if hit or (regex is not None and regex.fullmatch(path)):
                used.update(hit)
                add(path, "weight", path)
        for proj, name in _param_names(path, layer):
            hit = [t for t in params if _matches(name, t)]
            used.update(hit)
            if hit and proj not in plan.get(path, {}):
                add(path, proj, name)
    unmatched = [t for t in [*module_list, *params] if t not in used]
    if regex is not None and not plan:
        unmatched.append(modules)
    tied = [p for p in OUTSIDE_STACK if p in plan and getattr(model.config, "tie_word_embeddings", False)]
    if tied:
        raise ValueError(f"LoRA on {', '.join(tied)}: this model ties its head to its embedding "
                         f"(tie_word_embeddings), and one matrix cannot take two adapters; adapt neither")
    if unmatched:
        raise ValueError(f"LoRA target(s) {', '.join(map(repr, unmatched))} match no layer of this model. "
                         f"It has: {', '.join(available_targets(model))} (a target matches a path that ends in "
                         f"it; the routed experts are experts, experts.gate_up_proj, experts.down_proj)")
    return plan


def available_targets(model: nn.Module) -> list[str]:
    """The distinct leaf names a target can use on this model, for error messages and --help."""
    names: dict[str, None] = {}
    for path, layer in _candidates(model):
        if isinstance(layer, Experts):
            names.update({f"experts.{p}": None for p in EXPERT_PARAMS})
        elif isinstance(layer, Gate):
            names["gate"] = None
        elif path in OUTSIDE_STACK:
            names[path.rsplit(".", 1)[-1]] = None
        else:
            names[path.rsplit(".", 1)[-1]] = None
    return list(names)


# ---- applying ------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> LoraReport:
    """Freeze every parameter of `model`, then wrap the targeted layers with fresh adapters (A random from
    `seed`, B zero: outputs unchanged until training moves B). Only the adapters require grad."""
    modules, params = cfg.peft_targets()
    plan = resolve_plan(model, modules, params, cfg.rank, cfg.alpha)
    wrap(model, plan, cfg.dropout, seed)
    return lora_report(model)


def wrap(model: nn.Module, plan: Plan, dropout: float = 0.0, seed: int = 0) -> None:
    """Freeze the model and put adapters on the layers of `plan` (in model order, so a seed gives the same
    initial adapter every time)."""
    if any(isinstance(m, LORA_MODULES) for m in model.modules()):
        raise ValueError("the model already carries LoRA adapters: merge_lora(model) first, or load into them "
                         "with load_adapter")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for path, projs in plan.items():
        parent, name = _parent(model, path)
        layer = model.get_submodule(path)
        if isinstance(layer, Experts):
            new = LoraExperts(layer, projs.get("gate_up_proj"), projs.get("down_proj"), gen)
        elif isinstance(layer, Gate):
            new = LoraRouter(layer, *projs["weight"], gen)
        elif isinstance(layer, nn.Embedding):
            new = LoraEmbedding(layer, *projs["weight"], gen)
        else:
            new = LoraLinear(layer, *projs["weight"], dropout, gen)
        setattr(parent, name, new)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding `path`'s layer, and the attribute name it holds it under ("lm_head": the model)."""
    parent_path, _, name = path.rpartition(".")
    return model.get_submodule(parent_path), name


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear | LoraEmbedding | LoraExperts]]:
    for name, module in model.named_modules():
        if isinstance(module, LORA_MODULES):
            yield name, module


def lora_report(model: nn.Module) -> LoraReport:
    by_kind: dict[str, int] = {}
    layers = 0
    for path, layer in lora_layers(model):
        kind = ("routed experts" if isinstance(layer, LoraExperts) else "router" if isinstance(layer, LoraRouter)
                else "embedding" if isinstance(layer, LoraEmbedding) else "head" if path == "lm_head"
                else "attention" if ".self_attn." in path else "shared experts" if ".shared_experts." in path
                else "dense MLP")
        n = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
        by_kind[kind] = by_kind.get(kind, 0) + n
        layers += 1
    trainable, total = trainable_parameters(model)
    return LoraReport(trainable, total, by_kind, layers)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters); a tied head counts once."""
    params = list(model.parameters())  # deduplicated by identity
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- merging -------------------------------------------------------------------------------------
@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (α/r)·B·A, summed in fp32, rounded once to W's dtype)
    and put the plain layers back: the model is then an ordinary one, with every fast path of the engine
    and nothing per token for the adapter. Parameters stay frozen. Returns `model`."""
    for path, layer in list(lora_layers(model)):
        parent, name = _parent(model, path)
        base = layer.base_layer
        if isinstance(layer, (LoraLinear, LoraEmbedding)):
            _add(base.weight, layer.delta())
        else:
            I = layer.inter
            if layer.gate_up is not None:
                _add(base.gate_proj, layer.gate_up.delta(slice(0, I)))
                _add(base.up_proj, layer.gate_up.delta(slice(I, 2 * I)))
            if layer.down is not None:
                _add(base.down_proj, layer.down.delta())
        setattr(parent, name, base)
    return model


def _add(w: torch.Tensor, delta: torch.Tensor) -> None:
    w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
