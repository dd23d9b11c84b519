"""SFTConfig and DistillConfig: every knob of a fine-tuning or distillation run, saved as JSON beside it.

The optimizer, schedule and MoE fields carry TrainConfig's names and meanings, so deepmoe.train's
optimizer, schedule and checkpoint code read either config. Defaults follow DeepSeek-V3's SFT where it
says (cosine decay, AdamW) and the pretraining recipe otherwise; `resolve()` fills the `None` ones from
the model and the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig, list_presets
from ..lora import LoraConfig
from ..lora.apply import ALL_LINEAR
from ..train.config import SCHEDULES, check_recipe
from .data import BAD_LINE_POLICIES
from .grpo_loss import LOSS_TYPES as GRPO_LOSS_TYPES
from .grpo_loss import SCALE_REWARDS
from .losses import KL_KINDS

SFT_CONFIG = "sft_config.json"
DISTILL_CONFIG = "distill_config.json"
GRPO_CONFIG = "grpo_config.json"
DISTILL_MODES = ("logit", "sequence")
PRECISIONS = ("auto", "fp32", "bf16")  # pretraining's fp8 GEMMs are not wired into post-training


@dataclass
class SFTConfig:
    # what to train on
    model: str | None = None  # the model directory to fine-tune (its tokenizer comes with it)
    data: str | None = None  # a chat or prompt/completion JSONL file
    task: str | None = None  # or a built-in task spec, e.g. "arithmetic" or "arithmetic:max_digits=2"
    task_examples: int = 20000  # training problems generated for --task
    val_fraction: float = 0.05  # --data: records held out for validation (by content hash)
    val_examples: int = 200  # --task: held-out problems whose solutions give the validation loss
    eval_problems: int = 200  # --task: held-out problems answered through the engine for accuracy (0: off)
    max_new_tokens: int = 256  # generation budget of the accuracy evaluation
    on_bad_line: str = "stop"  # a malformed JSONL line: stop with its file:line, or skip it (listed in the log)
    out: str | None = None  # the run directory

    # batch
    seq_len: int | None = None  # longest example, in input tokens; None: min(1024, the model's context)
    batch_size: int = 16  # examples per micro-batch
    grad_accum: int = 1
    steps: int | None = None  # None: one epoch

    # optimizer and schedule (TrainConfig's names)
    lr: float | None = None  # None: 1e-3 for hidden_size <= 512, else 2e-5; 10x that under LoRA
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: 5% of the steps
    schedule: str = "cosine"
    decay_at: tuple[float, ...] = (0.8, 0.9)
    decay_factor: float = 0.316
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    # MoE and MTP
    mtp_weight: float = 0.1  # keeps the MTP layer in step with the tuned model, so speculative drafts still land
    bias_update_rate: float | None = None  # None: 0.001, and 0 under LoRA (the base, its bias included, is frozen)
    aux_loss_alpha: float | None = None  # None: the model config's
    capacity_factor: float | None = None

    # LoRA (deepmoe.lora, posttrain.lora): train a low-rank adapter on the frozen model instead of the model
    lora_rank: int | None = None  # None: full fine-tuning
    lora_alpha: float | None = None  # the update is scaled by alpha / rank; None: 2 · rank
    lora_targets: str = ALL_LINEAR  # comma-separated, as LoraConfig and peft name them; experts, gate: opt-in
    lora_dropout: float = 0.0  # on the input of the linear layers' A

    # execution
    device: str | None = None
    precision: str = "auto"
    qat: str | None = None  # quantisation-aware training (quant/qat.py), as TrainConfig's
    qat_group_size: int = 128
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    max_bad_steps: int = 10

    # observability and checkpoints
    eval_every: int | None = None  # None: a tenth of the steps
    eval_batches: int = 8
    checkpoint_every: int | None = None  # None: a quarter of the steps
    keep_checkpoints: int = 2
    plots: bool = True
    progress: bool = True

    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys of a saved config, kept

    FILE = SFT_CONFIG  # the name it is saved under in a run and its model directories

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid {type(self).__name__}: {msg}")

        need((self.data is None) != (self.task is None), "give exactly one of --data FILE and --task NAME")
        need(self.on_bad_line in BAD_LINE_POLICIES, f"on_bad_line must be one of {', '.join(BAD_LINE_POLICIES)}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
        need(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("task_examples", "batch_size", "grad_accum", "max_new_tokens", "eval_batches",
                     "keep_checkpoints", "max_bad_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be >= 1, got {v}")
        need(self.val_examples >= 0 and self.eval_problems >= 0, "val_examples and eval_problems must be >= 0")
        check_recipe(self, need)
        self._check_lora(need)

    def _check_lora(self, need) -> None:
        if self.lora_rank is None:
            need(self.lora_alpha is None and self.lora_targets == ALL_LINEAR and self.lora_dropout == 0.0,
                 "--lora-alpha, --lora-targets and --lora-dropout need --lora-rank R (LoRA fine-tuning)")
            return
        need(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        need(self.qat is None, "--qat trains the weights that will be quantised, but a LoRA run freezes them: "
                               "fine-tune fully with --qat, or quantise the merged LoRA model without it")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(any(t.strip() for t in self.lora_targets.split(",")),
             "lora_targets is empty; e.g. all-linear, or q_a_proj,kv_b_proj,o_proj,experts")
        # the balancing bias is a buffer of the base: moving it would make the trained model base + adapter +
        # a new bias, which no adapter file carries (see posttrain.lora)
        need(not self.bias_update_rate, f"a LoRA run keeps the base, its balancing bias included, unchanged: "
                                        f"bias_update_rate must be 0, got {self.bias_update_rate}")

    def lora_config(self) -> LoraConfig | None:
        """The adapter this run trains (None: full fine-tuning)."""
        if self.lora_rank is None:
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets,
                          dropout=self.lora_dropout)

    def default_lr(self, model_cfg: ModelConfig) -> float:
        # LoRA's low-rank update is usually trained at about 10x full fine-tuning's rate
        small = model_cfg.hidden_size <= 512
        return (1e-3 if small else 2e-5) if self.lora_rank is None else (1e-2 if small else 2e-4)

    def base_model_config(self) -> ModelConfig:
        """The config of the model training starts from."""
        if self.model is None:
            raise ValueError("--model DIR is required: the model directory to fine-tune")
        return ModelConfig.from_json(Path(self.model) / "config.json")

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        d["decay_at"] = list(self.decay_at)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        for f in dataclasses.fields(cls):  # JSON has lists where the config has tuples
            if isinstance(f.default, tuple) and isinstance(known.get(f.name), list):
                known[f.name] = tuple(known[f.name])
        cfg = cls(**known, extra={k: v for k, v in d.items() if k not in names})
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"config {str(path)!r} not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e


@dataclass
class DistillConfig(SFTConfig):
    """`model` is the student directory; or the student is freshly built from student_preset /
    student_config with the teacher's tokenizer."""
    teacher: str | None = None
    student_preset: str | None = None
    student_config: str | None = None
    mode: str = "logit"  # logit: match the teacher's next-token distributions; sequence: SFT on its answers
    kl: str = "forward"  # forward KL(teacher‖student), reverse KL(student‖teacher), or mix
    kl_mix: float = 0.5  # mix: weight of the forward term
    temperature: float = 1.0
    kd_weight: float = 0.5  # logit: loss = (1 − w) · CE(data) + w · T² · KL; 0: SFT on the data, no teacher run
    kd_chunk: int = 256  # positions per chunk of the KL (bounds teacher and student logits in memory)
    teacher_temperature: float = 0.0  # sequence: sampling temperature of the teacher's answers (0: greedy)
    keep_incorrect: bool = False  # sequence: also train on answers the task's reward marks wrong

    FILE = DISTILL_CONFIG

    def validate(self) -> None:
        super().validate()

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid DistillConfig: {msg}")

        need(self.teacher is not None, "--teacher DIR is required")
        sources = [s for s in (self.model, self.student_preset, self.student_config) if s is not None]
        need(len(sources) == 1, "give exactly one of --student DIR, --student-preset NAME, --student-config FILE")
        need(self.student_preset is None or self.student_preset in list_presets(),
             f"unknown preset {self.student_preset!r}; choose from {', '.join(list_presets())}")
        need(self.mode in DISTILL_MODES, f"mode must be one of {', '.join(DISTILL_MODES)}, got {self.mode!r}")
        need(self.mode == "logit" or self.task is not None,
             "sequence-level distillation needs --task: the teacher answers its prompts and the task checks them")
        need(self.kl in KL_KINDS, f"kl must be one of {', '.join(KL_KINDS)}, got {self.kl!r}")
        need(0.0 <= self.kl_mix <= 1.0 and 0.0 <= self.kd_weight <= 1.0, "kl_mix and kd_weight must be in [0, 1]")
        need(self.temperature > 0 and self.teacher_temperature >= 0, "temperatures must be > 0 (teacher: >= 0)")
        need(self.kd_chunk >= 1, "kd_chunk must be >= 1")
        need(self.lora_rank is None, "LoRA fine-tuning is deepmoe sft's (--lora-rank); distillation trains the "
                                     "whole student")

    def base_model_config(self) -> ModelConfig:
        if self.model is not None:
            return ModelConfig.from_json(Path(self.model) / "config.json")
        if self.student_preset is not None:
            return ModelConfig.from_preset(self.student_preset)
        return ModelConfig.from_json(self.student_config)


def resolve(cfg: SFTConfig, cuda_available: bool) -> SFTConfig:
    """Fill the `None` defaults that depend on the device and the model (the steps wait for the data:
    see resolve_steps)."""
    cfg.validate()
    model_cfg = cfg.base_model_config()
    r = dataclasses.replace(cfg, device=cfg.device or ("cuda" if cuda_available else "cpu"))
    if r.out is None:
        raise ValueError("--out RUN is required: the run directory to write")
    if r.seq_len is None:
        r.seq_len = min(1024, model_cfg.max_position_embeddings)
    if r.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"seq_len {r.seq_len} exceeds the model's max_position_embeddings "
                         f"({model_cfg.max_position_embeddings})")
    if r.lr is None:
        r.lr = r.default_lr(model_cfg)
    if r.aux_loss_alpha is None:
        r.aux_loss_alpha = float(model_cfg.aux_loss_alpha or 0.0)
    if r.bias_update_rate is None:
        r.bias_update_rate = 0.0 if r.lora_rank is not None else 0.001
    if r.lora_rank is not None:
        from .lora import plan_lora

        r.lora_alpha = r.lora_config().alpha  # saved as a number, not as "the default"
        plan_lora(model_cfg, r.lora_config(), r.model)  # a bad target fails now, before data and model load
    if r.precision == "bf16" and not r.device.startswith("cuda"):
        raise ValueError("bf16 autocast is for CUDA; on CPU train in fp32 (--precision fp32)")
    r.validate()
    return r


def resolve_steps(cfg: SFTConfig, num_train_examples: int) -> SFTConfig:
    """Fill steps (one epoch of the training set) and what is derived from it."""
    r = dataclasses.replace(cfg)
    if r.steps is None:
        r.steps = max(1, num_train_examples // (r.batch_size * r.grad_accum))
    if r.warmup_steps is None:
        r.warmup_steps = max(1, r.steps // 20)
    if r.eval_every is None:
        r.eval_every = max(1, r.steps // 10)
    if r.checkpoint_every is None:
        r.checkpoint_every = max(1, r.steps // 4)
    return r


@dataclass
class GRPOConfig(SFTConfig):
    """GRPO on a built-in task (`task`) or on a JSONL of prompts (`data`) scored by `rewards`. Inherited
    fields keep their meaning, except: batch_size counts prompts per step (each gets num_generations
    completions) and grad_accum splits a step's completions into that many micro-batches; max_new_tokens
    is the rollouts' budget too. Defaults differ from SFT's where RL practice differs (see docs/grpo.md)."""
    batch_size: int = 8  # prompts per step
    steps: int | None = 100
    task_examples: int = 4096  # training prompts generated for --task
    val_examples: int = 0  # (unused: GRPO has no reference completions to take a loss on)
    eval_problems: int = 100
    max_new_tokens: int = 128
    schedule: str = "constant"
    weight_decay: float = 0.0
    mtp_weight: float = 0.0  # the rollouts are not trained on as text: the MTP layers stay as they are
    bias_update_rate: float = 0.0  # P prompts × G near-copies are no sample of the traffic to balance for

    num_generations: int = 8  # G: completions per prompt, the group each is compared with
    num_iterations: int = 1  # μ: optimizer steps on each rollout batch (the ratio moves off 1 after the first)
    temperature: float = 1.0  # rollout sampling temperature; log-probabilities are taken at it too
    epsilon: float = 0.2  # clip range below 1 (and above, unless epsilon_high)
    epsilon_high: float | None = None  # DAPO's clip-higher (e.g. 0.28); None: epsilon
    beta: float = 0.0  # KL(π‖π_ref) coefficient, k3 estimator; 0 loads no reference model
    loss_type: str = "dapo"  # grpo | dapo | dr_grpo (see posttrain.grpo_loss)
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated: bool = False  # completions cut at max_new_tokens carry no loss (DAPO's overlong filter)
    rewards: tuple[str, ...] = ()  # module:function reward functions (added to a task's own reward)
    reward_weights: tuple[float, ...] = ()  # one per reward function, the task's first; default all 1
    logprob_chunk: int = 1024  # positions whose fp32 logits exist at once

    FILE = GRPO_CONFIG

    def default_lr(self, model_cfg: ModelConfig) -> float:
        # policy-gradient steps are noisy, and Adam moves every weight by ~lr whatever its gradient's size: on
        # the tiny model 1e-4 and 3e-4 lowered held-out accuracy where 2e-5 raised it (docs/experiments.md (f))
        return 2e-5 if model_cfg.hidden_size <= 512 else 1e-6

    def validate(self) -> None:
        super().validate()

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid GRPOConfig: {msg}")

        need(self.num_generations >= 2, f"num_generations must be >= 2 (a group to compare with), got "
                                        f"{self.num_generations}")
        need(self.num_iterations >= 1 and self.logprob_chunk >= 1, "num_iterations and logprob_chunk must be >= 1")
        need(self.temperature > 0, f"temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        need(0 < self.epsilon < 1, f"epsilon must be in (0, 1), got {self.epsilon}")
        need(self.epsilon_high is None or self.epsilon_high > 0, f"epsilon_high must be > 0, got {self.epsilon_high}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.loss_type in GRPO_LOSS_TYPES, f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}")
        need(self.scale_rewards in SCALE_REWARDS, f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}")
        # the rollout engine samples from an unquantised copy: the policy it samples would not be the one trained
        need(self.qat is None, "--qat is for deepmoe sft/train/distill; GRPO's rollouts come from an unquantised "
                               "copy of the policy, so its ratios would compare two different models")
        need(self.data is None or bool(self.rewards), "--data prompts need at least one --rewards function to score "
                                                      "their completions")
        n_rewards = len(self.rewards) + (self.task is not None)
        need(not self.reward_weights or len(self.reward_weights) == n_rewards,
             f"{len(self.reward_weights)} reward weights for {n_rewards} reward functions (the task's counts first)")
        need(self.mtp_weight == 0, "GRPO does not train the MTP layers (mtp_weight must be 0)")
        need(self.lora_rank is None, "GRPO trains the whole model; for an adapter, deepmoe merge it into its base first")
