"""`deepmoe sft`: supervised fine-tuning of a model directory on conversations or on a built-in task.

The loop is the pretraining loop's, piece for piece (deepmoe.train's AdamW and schedules, aux-loss-free
bias updates, metrics.jsonl, plots, atomic checkpoints, bit-exact resume); what changes is the batch and
the objective. A batch is a set of padded examples (see posttrain.data), and one optimizer step's loss is
    Σ CE over trained-on tokens / #trained-on tokens of the step   (+ λ · MTP, + α · balance)
so an example's weight is its number of assistant tokens, whatever micro-batch it lands in. Only the
assistant tokens (and eos) are targets; the final hidden state of any other position receives exactly
zero gradient.

With cfg.lora_rank set, the model trained is the frozen base with LoRA adapters on it, and what is
checkpointed and written at the end is the adapter (posttrain.lora); the loop is the same.

Extension points, for other objectives: `model_hook(model)` runs on the loaded model before the optimizer
is built, and only parameters that still require grad are optimised; subclasses override `objective`
(distillation adds a KL term), `initial_model`, `build_data`, `describe_data`, `train_step` (a
policy-gradient step draws its own batches) and `write_final`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_pretrained
from ..data import BatchSampler
from ..durable import atomic_write_text, mkdir, mkdtemp, replace_dir
from ..lora import lora_report
from ..model import DeepSeekModel
from ..model.moe import MoE
from ..tasks import get_task
from ..tokenizer import Tokenizer, load_tokenizer
from ..train.balance import load_metrics, moe_layers
from ..train.loop import TrainingError, optimizer_update
from ..train.metrics import MetricsLog
from ..train.optim import build_optimizer, lr_at, set_lr
from ..train.state import list_checkpoints, load_trainer_state, save_checkpoint, write_model_dir
from ..train.transforms import apply_activation_checkpointing, apply_compile, autocast_context, qat_summary
from .config import SFTConfig, resolve_steps
from .data import Batch, SFTData, build_sft_data, load_records
from .footprint import footprint, format_footprint
from .lora import ADAPTER, add_adapter, write_adapter_checkpoint, write_lora_final
from .losses import masked_balance_loss, masked_expert_counts, masked_mtp_losses

ModelHook = Callable[[DeepSeekModel], None]


@dataclass
class StepResult:
    loss: float
    parts: dict[str, float]  # objective terms per target token of the step (ce, kd, ...)
    mtp: float | None
    aux: float | None
    counts: torch.Tensor | None  # (L, E) real-token copies per expert


@dataclass
class Objective:
    """One micro-batch's objective: `loss` is a sum over its target tokens; `parts` its named terms (sums)."""
    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def engine_dtype(device: str) -> torch.dtype:
    # CPU decodes in fp32 (bf16 matmuls there are slow and lossy); CUDA in bf16, as served
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, resume: bool = False, model_hook: ModelHook | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.device = torch.device(cfg.device)
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints and not resume:
            raise ValueError(f"{str(self.run_dir)!r} already holds a run (checkpoints up to "
                             f"{checkpoints[-1].name}); pass --resume to continue it or choose another --out")
        if resume and not checkpoints:
            raise ValueError(f"nothing to resume in {str(self.run_dir)!r}: it has no complete checkpoint")
        torch.manual_seed(cfg.seed)
        self.task = get_task(cfg.task) if cfg.task else None
        self.tokenizer = self.load_tokenizer()
        self.data: SFTData = self.build_data()
        self.cfg = cfg = resolve_steps(cfg, len(self.data.train))
        mkdir(self.run_dir)  # only once the data is known to be usable
        ckpt = checkpoints[-1] if resume else None
        self.lora = cfg.lora_config()
        self.model = self.load_model(ckpt)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{self.model.config.vocab_size}: they do not belong together")
        self.model.train()
        if model_hook is not None:
            model_hook(self.model)
        self.moe = moe_layers(self.model)  # main stack first, then MTP blocks: router_out's order
        self.n_main_moe = sum(isinstance(b.mlp, MoE) for b in self.model.model.layers)
        self.mtp_moe = [isinstance(m.block.mlp, MoE) for m in self.model.mtp]
        blocks = [*self.model.model.layers, *(m.block for m in self.model.mtp)]
        self.moe_layer_ids = [i for i, block in enumerate(blocks) if block.mlp in self.moe]
        self.optimizer = build_optimizer(self.model, cfg)  # parameters that require grad only
        self.sampler = BatchSampler(len(self.data.train), cfg.batch_size, cfg.seed)
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "target_tokens": 0, "skipped_steps": 0,
                                      "bad_in_a_row": 0, "elapsed_s": 0.0}
        if ckpt is not None:
            saved = load_trainer_state(ckpt, self.model, self.optimizer)
            self.sampler.load_state_dict(saved.pop("sampler"))
            self.state.update(saved)
        else:
            atomic_write_text(self.run_dir / cfg.FILE, json.dumps(cfg.to_dict(), indent=2))
        if cfg.qat:  # after loading: the same Parameters, fake-quantised in the forward pass
            print(qat_summary(self.model, cfg))
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if cfg.compile:
            apply_compile(self.model)
        self.autocast = autocast_context(self.device, cfg.precision)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.state["step"] if ckpt else None)

    # ---- what subclasses change -------------------------------------------------------------------
    def load_tokenizer(self) -> Tokenizer:
        if not (Path(self.cfg.model) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{self.cfg.model!r} has no tokenizer.json; fine-tuning needs the tokenizer "
                                    "the model was trained with, saved in its directory")
        return load_tokenizer(self.cfg.model)

    def build_data(self) -> SFTData:
        cfg = self.cfg
        train, val, notes = load_records(data=cfg.data, task=self.task, task_examples=cfg.task_examples,
                                         val_examples=cfg.val_examples, val_fraction=cfg.val_fraction,
                                         seed=cfg.seed, on_bad_line=cfg.on_bad_line)
        return build_sft_data(self.tokenizer, cfg.seq_len, train, val, notes)

    def initial_model(self) -> DeepSeekModel:
        return load_pretrained(self.cfg.model, device=self.device, dtype=torch.float32)

    def load_model(self, ckpt: Path | None) -> DeepSeekModel:
        """The model to train: the starting one, or checkpoint `ckpt`'s. Under LoRA a checkpoint holds only
        the adapter, so the starting model (the unchanged base) is always loaded and the adapter put on it."""
        if self.lora is None:
            return (self.initial_model() if ckpt is None
                    else load_pretrained(ckpt, device=self.device, dtype=torch.float32))
        model = self.initial_model()
        add_adapter(model, self.lora, self.cfg.seed, ckpt)
        return model

    def objective(self, batch: Batch, hidden: torch.Tensor) -> Objective:
        ce = self.cross_entropy(batch, hidden)
        return Objective(ce, {"ce": ce})

    def cross_entropy(self, batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
        """Σ cross-entropy of the trained-on tokens. The head only sees their hidden states (N, d), so no
        logits are computed, and no gradient flows, anywhere else."""
        h = hidden[batch.target]
        return F.cross_entropy(self.model.lm_head(h).float(), batch.y[batch.target], reduction="sum")

    def write_final(self) -> Path:
        if self.lora is not None:
            return write_lora_final(self.run_dir, self.model, self.tokenizer, self.cfg)
        final = self.run_dir / "final"
        tmp = mkdtemp(prefix=".final.", dir=self.run_dir)
        try:
            write_model_dir(tmp, self.model, self.tokenizer, self.cfg, self.cfg.FILE)
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    # ---- one optimizer step ----------------------------------------------------------------------
    def forward_backward(self, b: Batch, n_targets: int, n_mtp: list[int]) -> StepResult:
        """One micro-batch; its gradient, already divided by the step's target counts, accumulates in .grad."""
        cfg, model = self.cfg, self.model
        router_out: list = []
        with self.autocast or contextlib.nullcontext():
            hidden = model.hidden_states(b.x, router_out=router_out, capacity_factor=cfg.capacity_factor)
            obj = self.objective(b, hidden)
            sums = []  # per MTP depth; a batch shorter than a depth has none for it
            if n_mtp:
                sums = masked_mtp_losses(model.mtp_logits(hidden, b.x, router_out, cfg.capacity_factor), b.y, b.target)
            mtp = sum(s / max(n, 1) for s, n in zip(sums, n_mtp)) / len(sums) if sums else None
        valid = [b.valid] * self.n_main_moe
        for k, has_moe in enumerate(self.mtp_moe[:len(sums)], start=1):
            valid += [b.valid[:, k:]] * has_moe
        routings = router_out[:len(valid)]  # under activation checkpointing the recompute appends more later
        loss = obj.loss / n_targets + (0.0 if mtp is None else cfg.mtp_weight * mtp)
        aux = None
        if cfg.aux_loss_alpha > 0 and routings:
            E, k = model.config.n_routed_experts, model.config.num_experts_per_tok
            aux = cfg.aux_loss_alpha * sum(masked_balance_loss(r, v, E, k) for r, v in zip(routings, valid))
            loss = loss + aux / cfg.grad_accum
        counts = masked_expert_counts(routings, valid, model.config.n_routed_experts) if routings else None
        loss.backward()
        return StepResult(float(loss.detach()), {k: float(v.detach()) / n_targets for k, v in obj.parts.items()},
                          None if mtp is None else float(mtp.detach()), None if aux is None else float(aux.detach()),
                          counts)

    def train_step(self) -> dict[str, Any]:
        cfg, step = self.cfg, self.state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        batches = [self.data.train.batch(next(self.sampler)).to(self.device) for _ in range(cfg.grad_accum)]
        n_targets = sum(int(b.target.sum()) for b in batches)
        depths = len(self.model.mtp) if cfg.mtp_weight > 0 else 0
        n_mtp = [sum(int(b.target[:, k:].sum()) for b in batches) for k in range(1, depths + 1)]
        results = [self.forward_backward(b, n_targets, n_mtp) for b in batches]
        loss = sum(r.loss for r in results)
        counts = None if results[0].counts is None else sum(r.counts for r in results)
        grad_norm, skipped = optimizer_update(self.model, self.optimizer, self.moe, counts, loss, cfg, self.state)
        real = sum(int(b.valid.sum()) for b in batches)
        dt = time.perf_counter() - t0
        st = self.state
        st["step"] += 1
        st["tokens"] += real
        st["target_tokens"] += n_targets
        st["elapsed_s"] += dt
        record = {"kind": "train", "step": st["step"], "tokens": st["tokens"], "target_tokens": st["target_tokens"],
                  "loss": loss, **{k: sum(r.parts[k] for r in results) for k in results[0].parts},
                  "mtp_loss": None if results[0].mtp is None else sum(r.mtp for r in results),
                  "aux_loss": None if results[0].aux is None else sum(r.aux for r in results) / len(results),
                  "lr": lr, "grad_norm": grad_norm, "tok_per_s": real / dt, "elapsed_s": st["elapsed_s"],
                  "pad_fraction": 1 - real / sum(b.x.numel() for b in batches), "skipped": skipped,
                  "moe_layers": self.moe_layer_ids[:0 if counts is None else len(counts)]}
        record.update(load_metrics(counts) if counts is not None else
                      {"max_vio": [], "min_share": [], "max_share": [], "dead_experts": [], "expert_share": []})
        self.metrics.write(record)
        if st["bad_in_a_row"] >= cfg.max_bad_steps:
            last = list_checkpoints(self.run_dir)
            raise TrainingError(
                f"loss or gradients were non-finite for {cfg.max_bad_steps} steps in a row (up to step {st['step']}); "
                f"stopping. Last good checkpoint: {str(last[-1]) if last else 'none'}. Lower --lr or check the "
                "data, then --resume.")
        return record

    def describe_data(self, echo) -> None:
        cfg, d = self.cfg, self.data
        source = cfg.data or f"task {cfg.task}"
        val = f"{len(d.val)} val examples ({d.val.num_targets():,} target tokens)" if d.val else "no validation split"
        echo(f"data      {source}: {len(d.train)} train examples ({d.train.num_targets():,} target tokens), {val}")
        for note in d.notes:
            echo(f"note      {note}")

    # ---- evaluation, checkpoints ------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, max_batches: int | None) -> dict[str, float] | None:
        """Mean cross-entropy per trained-on token over fixed validation examples (spread over the set): the
        data's loss whatever the training objective, so fine-tuned and distilled runs compare."""
        val = self.data.val
        if val is None:
            return None
        self.model.eval()
        bs = self.cfg.batch_size
        n = len(val) if max_batches is None else min(len(val), max_batches * bs)
        chosen = np.linspace(0, len(val) - 1, n).round().astype(np.int64)
        total, count = 0.0, 0
        for i in range(0, n, bs):
            b = val.batch(chosen[i:i + bs]).to(self.device)
            with self.autocast or contextlib.nullcontext():
                total += float(self.cross_entropy(b, self.model.hidden_states(b.x)))
            count += int(b.target.sum())
        self.model.train()
        loss = total / count
        return {"loss": loss, "ppl": math.exp(min(loss, 80.0)), "tokens": count}

    def log_validation(self, full: bool = False) -> dict[str, float] | None:
        r = self.validate(None if full else self.cfg.eval_batches)
        if r is not None:
            self.metrics.write({"kind": "val", "step": self.state["step"], "tokens": self.state["tokens"],
                                "val_loss": r["loss"], "val_ppl": r["ppl"], "full": full})
        return r

    def save(self) -> Path:
        state = dict(self.state, sampler=self.sampler.state_dict())
        return save_checkpoint(self.run_dir, self.model, self.tokenizer, self.optimizer, self.cfg, state,
                               config_name=self.cfg.FILE,
                               write_model=write_model_dir if self.lora is None else write_adapter_checkpoint)

    # ---- what the run loop asks of a trainer (GRPO reports other things) -------------------------------
    echo = staticmethod(print)  # where messages go; run() points it at the progress bar's writer

    def schedule_text(self) -> str:
        cfg = self.cfg
        return f"{cfg.steps} steps of {cfg.grad_accum} x {cfg.batch_size} examples, seq_len {cfg.seq_len}"

    def progress_fields(self, r: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{r['loss']:.3f}", "tok_s": f"{r['tok_per_s']:,.0f}"}

    def after_step(self, r: dict[str, Any]) -> None:
        pass

    def write_plots(self) -> list[Path]:
        from ..train.plots import write_plots

        return write_plots(self.run_dir)

    def summary_extra(self) -> dict[str, Any]:
        return {}

    def task_accuracy(self, model_dir: str | Path) -> dict[str, Any] | None:
        """Held-out accuracy of the model in model_dir on the task, through the engine (None without a task)."""
        if self.task is None or not self.cfg.eval_problems:
            return None
        from ..engine.llm import LLM
        from ..tasks.evaluate import accuracy

        llm = LLM(model_dir, device=self.cfg.device, dtype=engine_dtype(self.cfg.device))
        problems = self.task.problems("test", self.cfg.eval_problems, self.cfg.seed)
        return accuracy(llm, self.task, problems, self.cfg.max_new_tokens, tokenizer=self.tokenizer)


def format_accuracy(label: str, r: dict[str, Any]) -> str:
    return (f"{label:<9} exact match {r['accuracy']:.1%}, well-formed {r['format']:.1%}, mean reward "
            f"{r['mean_reward']:.3f} on {r['n']} held-out problems")


def run(trainer: SFTTrainer, echo=print) -> dict[str, Any]:
    """Train (or continue) to cfg.steps, write final/, evaluate; return the summary also written to
    RUN/summary.json."""
    from tqdm.auto import tqdm

    cfg, state, run_dir = trainer.cfg, trainer.state, trainer.run_dir
    trainer.describe_data(echo)
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    echo(f"model     {trainer.model.num_parameters() / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
         f"device {cfg.device}, {trainer.schedule_text()}")
    sizes = footprint(trainer.model)
    lora = None
    if trainer.lora is not None:
        report = lora_report(trainer.model)
        lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": list(trainer.lora.targets),
                "dropout": cfg.lora_dropout, "layers": report.layers, "by_kind": report.by_kind}
        echo(f"lora      rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}, targets {cfg.lora_targets}: {report}")
    echo(format_footprint(sizes))
    if state["step"] >= cfg.steps and (run_dir / "summary.json").is_file():
        echo(f"the run in {str(run_dir)!r} is complete ({state['step']} steps); nothing to resume")
        trainer.metrics.close()
        return json.loads((run_dir / "summary.json").read_text())
    if state["step"]:
        echo(f"resuming  from step {state['step']}")
    elif "accuracy_before" not in state and cfg.model is not None:
        before = trainer.task_accuracy(cfg.model)
        if before is not None:
            state["accuracy_before"] = before
            echo(format_accuracy("before", before))
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not cfg.progress, unit="step", dynamic_ncols=True)
    trainer.echo = bar.write if cfg.progress else echo
    with trainer.metrics, bar:
        while state["step"] < cfg.steps:
            r = trainer.train_step()
            bar.update(1)
            bar.set_postfix(**trainer.progress_fields(r), refresh=False)
            trainer.after_step(r)
            step = state["step"]
            if step % cfg.eval_every == 0 and step < cfg.steps:
                v = trainer.log_validation()
                if v is not None:
                    trainer.echo(f"step {step:>6}  val loss {v['loss']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                trainer.save()
        last_val = trainer.log_validation(full=True)
    final = trainer.write_final()
    after = trainer.task_accuracy(final)
    trainer.echo = echo
    plots = [p.name for p in trainer.write_plots()] if cfg.plots else []
    summary = {"steps": state["step"], "tokens": state["tokens"], "target_tokens": state["target_tokens"],
               "skipped_steps": state["skipped_steps"], "train_time_s": round(state["elapsed_s"], 1),
               "tokens_per_s": round(state["tokens"] / max(state["elapsed_s"], 1e-9)),
               "val_loss": last_val and last_val["loss"], "val_ppl": last_val and last_val["ppl"],
               "accuracy_before": state.get("accuracy_before"), "accuracy": after, "final": str(final),
               "adapter": str(run_dir / ADAPTER) if lora else None, "lora": lora, **sizes, "plots": plots,
               **trainer.summary_extra()}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def sft(cfg: SFTConfig, resume: bool = False, model_hook: ModelHook | None = None, echo=print) -> dict[str, Any]:
    """`deepmoe sft`: fine-tune cfg.model (cfg resolved by posttrain.config.resolve)."""
    return run(SFTTrainer(cfg, resume, model_hook), echo)


__all__ = ["SFTTrainer", "sft", "run", "Objective", "ModelHook"]
