"""TrainConfig: every knob of a pretraining run, saved as JSON beside its outputs.

Defaults are DeepSeek-V3's recipe where one applies (AdamW β = (0.9, 0.95), weight decay 0.1, clip 1.0,
MTP weight λ = 0.3, bias update rate γ = 0.001, dropless routing) and sized so that `deepmoe train`
with no arguments trains the `tiny` preset on the Python standard library in under 15 minutes on two
CPU cores. Fields left `None` are resolved by `resolve()` from the device and preset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig, list_presets

SCHEDULES = ("multistep", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp8")
QAT_SCHEMES = ("int8", "int4")  # `deepmoe quantize`'s integer schemes (quant/qat.py)


def check_recipe(cfg, need) -> None:
    """The optimizer, schedule and loss settings pretraining and post-training share: need(ok, message)
    reports each one that is out of range."""
    need(cfg.lr is None or cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.warmup_steps is None or cfg.warmup_steps >= 0, "warmup_steps must be >= 0")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]")
    need(all(0.0 < m < 1.0 for m in cfg.decay_at) and list(cfg.decay_at) == sorted(cfg.decay_at),
         f"decay_at must be increasing fractions in (0, 1), got {cfg.decay_at}")
    need(0.0 < cfg.decay_factor <= 1.0, "decay_factor must be in (0, 1]")
    need(0.0 <= cfg.beta1 < 1.0 and 0.0 <= cfg.beta2 < 1.0, "betas must be in [0, 1)")
    need(cfg.weight_decay >= 0 and cfg.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
    need(cfg.mtp_weight >= 0 and (cfg.bias_update_rate or 0.0) >= 0, "mtp_weight and bias_update_rate must be >= 0")
    need(cfg.aux_loss_alpha is None or cfg.aux_loss_alpha >= 0, "aux_loss_alpha must be >= 0")
    need(cfg.capacity_factor is None or cfg.capacity_factor > 0, "capacity_factor must be > 0")
    need(cfg.qat is None or cfg.qat in QAT_SCHEMES, f"qat must be one of {', '.join(QAT_SCHEMES)}, got {cfg.qat!r}")
    need(cfg.qat_group_size >= 8 and cfg.qat_group_size % 8 == 0,
         f"qat_group_size must be a positive multiple of 8 (as `deepmoe quantize --group-size`), got "
         f"{cfg.qat_group_size}")
    need(cfg.qat is None or cfg.precision != "fp8", "--qat fake-quantises weights to int8/int4 while --precision "
                                                    "fp8 runs the GEMMs in FP8: choose one")


@dataclass
class TrainConfig:
    # model and data
    preset: str | None = None  # None: tiny on CPU, ref-813M on CUDA
    model_config: str | None = None  # a config.json instead of a preset
    data: str | None = None  # None: the Python standard library of this interpreter
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizer directory; None: train byte-level BPE on the train split
    val_fraction: float = 0.05
    out: str | None = None  # run directory; None: runs/<preset>
    cache_dir: str | None = None  # tokenizer and token-stream cache; None: $DEEPMOE_CACHE or ~/.cache/deepmoe

    # batch
    seq_len: int | None = None
    batch_size: int | None = None  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int | None = None  # optimizer steps

    # optimizer and schedule
    lr: float | None = None
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup_steps: int | None = None
    schedule: str = "multistep"
    # DeepSeek's multi-step schedule: the rate drops to 31.6% at 80% of training and to 10% at 90%
    decay_at: tuple[float, ...] = (0.8, 0.9)
    decay_factor: float = 0.316
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    # MoE and MTP objectives
    mtp_weight: float = 0.3  # λ: loss = CE + λ · mean over MTP depths of their CE
    bias_update_rate: float = 0.001  # γ of aux-loss-free balancing; 0 disables it
    aux_loss_alpha: float | None = None  # α of the sequence-wise balance loss; None: the model config's
    capacity_factor: float | None = None  # None: dropless

    # execution
    device: str | None = None  # None: cuda if available, else cpu
    # auto: bf16 on CUDA, fp32 on CPU; bf16: bf16 compute weights over fp32 masters under autocast
    # (train/compute_weights.py; slow on CPUs without bf16 matmul units, but exact to resume there too);
    # fp8: FP8 GEMMs (train/fp8.py)
    precision: str = "auto"
    # quantisation-aware training (quant/qat.py): the weights `deepmoe quantize --scheme qat` would quantise
    # are fake-quantised in the forward pass (straight-through gradient); None: off
    qat: str | None = None
    qat_group_size: int = 128
    activation_checkpointing: bool = False
    # expert-parallel size under torchrun: ranks that split the routed experts (deepmoe/parallel/mesh.py)
    ep: int = 1
    # pipeline-parallel size under torchrun: stages of contiguous decoder layers, one per rank, 1F1B over the
    # --grad-accum micro-batches (deepmoe/parallel/pipeline.py)
    pp: int = 1
    compile: bool = False
    seed: int = 0
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops

    # observability and checkpoints
    eval_every: int | None = None
    eval_batches: int = 8
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    # snapshot into host memory and write on a background thread (train/async_checkpoint.py). On for CPU too:
    # the files are byte-identical to a synchronous save's and training never reads them (both tested), so
    # one code path serves every device, and the CPU tests run the one GPU runs use; the cost is host memory
    # for a copy of the weights and AdamW moments while a save is in flight
    async_checkpoint: bool = True
    plots: bool = True
    progress: bool = True
    sample_tokens: int = 96  # a greedy sample printed and saved at the end; 0 disables

    # settings changed on resume, oldest first: {"step": S, "changes": {name: {"from": old, "to": new}}}, in
    # force from step S + 1 on (`resume_config`)
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys of a saved config, kept

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid training config: {msg}")

        need(self.preset is None or self.model_config is None, "give either preset or model_config, not both")
        need(self.preset is None or self.preset in list_presets(),
             f"unknown preset {self.preset!r}; choose from {', '.join(list_presets())}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
        need(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("seq_len", "batch_size", "steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be >= 1, got {v}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.ep >= 1, f"ep must be >= 1, got {self.ep}")
        need(self.pp >= 1, f"pp must be >= 1, got {self.pp}")
        check_recipe(self, need)
        need(self.eval_batches >= 1 and self.keep_checkpoints >= 1 and self.max_bad_steps >= 1,
             "eval_batches, keep_checkpoints and max_bad_steps must be >= 1")
        need(self.sample_tokens >= 0, "sample_tokens must be >= 0")
        need(isinstance(self.history, list), "history must be a list of changes")

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        d["decay_at"] = list(self.decay_at)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        if "decay_at" in known:
            known["decay_at"] = tuple(known["decay_at"])
        cfg = cls(**known, extra={k: v for k, v in d.items() if k not in names})
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"training config {str(path)!r} not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e


# What `--resume` may change. Where the run lives, how it is logged and checkpointed and how long it runs,
# and, to recover from a divergence, the optimizer and the learning-rate schedule: the schedule is a pure
# function of the step and the config, so the new one simply takes over from the checkpoint's step (a longer
# --warmup-steps continues the ramp from there). Every other field must match: it would change the data,
# the model or the objective under the saved optimizer state.
RESUME_LOGISTICS = frozenset({"out", "cache_dir", "device", "steps", "eval_every", "eval_batches", "checkpoint_every",
                              "keep_checkpoints", "async_checkpoint", "plots", "progress", "sample_tokens",
                              "max_bad_steps", "ep", "pp"})
RESUME_OPTIMIZER = frozenset({"lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_at", "decay_factor", "beta1",
                              "beta2", "eps", "weight_decay", "grad_clip"})
_UNRECORDED = ("out", "cache_dir", "history")  # where the files are is not a setting of the run


def resume_config(saved: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The saved config of a run with the fields in `given` that a resume may change; a ValueError naming
    the flags that would change anything else."""
    refused = sorted(k for k, v in given.items()
                     if k not in RESUME_LOGISTICS | RESUME_OPTIMIZER and getattr(saved, k) != v)
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise ValueError(f"--resume continues the saved run; these flags would change its data, model or objective: "
                         f"{flags} (remove them). A resume may change the optimizer and schedule (--lr, "
                         "--warmup-steps, --schedule, ...), --steps and the logging and checkpoint flags")
    return dataclasses.replace(saved, **given)


def config_changes(old: TrainConfig, new: TrainConfig) -> dict[str, dict[str, Any]]:
    """{field: {"from": old value, "to": new value}} for every setting that differs (JSON values)."""
    a, b = old.to_dict(), new.to_dict()
    return {k: {"from": a.get(k), "to": b.get(k)} for k in sorted(a.keys() | b.keys())
            if k not in _UNRECORDED and a.get(k) != b.get(k)}


def default_cache_dir() -> str:
    """Where tokenizers and token streams are cached: $DEEPMOE_CACHE, else ~/.cache/deepmoe."""
    return os.environ.get("DEEPMOE_CACHE") or str(Path.home() / ".cache" / "deepmoe")


def resolve(cfg: TrainConfig, cuda_available: bool) -> tuple[TrainConfig, ModelConfig]:
    """Fill every `None` default from the device and preset; return it with the model config.
    The resolved config is what gets saved, so a resumed run never re-derives anything."""
    cfg.validate()
    device = cfg.device or ("cuda" if cuda_available else "cpu")
    on_gpu = device.startswith("cuda")
    if cfg.model_config is not None:
        model_cfg = ModelConfig.from_json(cfg.model_config)
        preset = None
    else:
        preset = cfg.preset or ("ref-813M" if on_gpu else "tiny")
        model_cfg = ModelConfig.from_preset(preset)
    small = model_cfg.hidden_size <= 512
    # the CPU default: 600 steps of 8 × 256 tokens (1.2M tokens, ~0.45 epoch of the stdlib) fit 15 minutes
    # on two cores, MTP included
    defaults = dict(seq_len=256 if small else 1024, batch_size=8, steps=600 if small else 5000,
                    lr=3e-3 if small else 1e-3)
    r = dataclasses.replace(cfg, preset=preset, device=device)
    for name, value in defaults.items():
        if getattr(r, name) is None:
            setattr(r, name, value)
    if r.warmup_steps is None:
        r.warmup_steps = min(100, max(r.steps // 20, 1))
    if r.eval_every is None:
        r.eval_every = max(r.steps // 10, 1)
    if r.checkpoint_every is None:
        r.checkpoint_every = max(r.steps // 4, 1)
    if r.out is None:
        r.out = str(Path("runs") / (preset or Path(cfg.model_config).stem))
    if r.cache_dir is None:
        r.cache_dir = default_cache_dir()
    if r.aux_loss_alpha is None:
        r.aux_loss_alpha = float(model_cfg.aux_loss_alpha or 0.0)
    if r.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"seq_len {r.seq_len} exceeds the model's max_position_embeddings "
                         f"({model_cfg.max_position_embeddings})")
    r.validate()
    return r, model_cfg
