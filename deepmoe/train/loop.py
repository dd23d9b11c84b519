"""The pretraining loop: DeepSeek's objective and balancing, observable, resumable bit for bit.

One optimizer step = grad_accum micro-batches of (B, T) tokens. Each micro-batch's loss is
    CE(main head) + λ · mean_k CE(MTP depth k) + α · Σ_layers sequence-balance loss
After the step, every noaux_tc router's correction bias moves by ±γ toward balance, from the loads
counted over the whole step. Non-finite losses or gradients skip the step (counted); too many in a row
stop the run with the last good checkpoint intact. On CPU the run is deterministic: stopping at a
checkpoint and resuming gives the same losses, bit for bit, as never stopping.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_pretrained
from ..config import ModelConfig
from ..data import BatchSampler
from ..durable import atomic_write_text, mkdir, mkdtemp, replace_dir
from ..generate import generate
from ..model import build_model
from .balance import expert_counts, load_metrics, moe_layers, update_bias
from .config import TrainConfig
from .data import TrainData, prepare_data
from .evaluate import evaluate
from .fp8 import convert_to_fp8_training
from .losses import cross_entropy, mtp_loss, sequence_balance_loss
from .metrics import MetricsLog
from .optim import build_optimizer, lr_at, set_lr
from .state import TRAIN_CONFIG, list_checkpoints, load_trainer_state, save_checkpoint, write_model_dir
from .transforms import apply_activation_checkpointing, apply_compile, autocast_context

SAMPLE_PROMPT = "def "


class TrainingError(RuntimeError):
    pass


def _item(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach())


def _mean(values: list[float | None]) -> float | None:
    return None if values[0] is None else sum(values) / len(values)


@dataclass
class StepResult:
    loss: float
    ce: float
    mtp: float | None
    aux: float | None
    counts: torch.Tensor | None  # (L, E) token copies per expert over the step


class Trainer:
    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.run_dir = Path(cfg.out)
        self.device = torch.device(cfg.device)
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints and not resume:
            raise ValueError(f"{str(self.run_dir)!r} already holds a run (checkpoints up to "
                             f"{checkpoints[-1].name}); pass --resume to continue it or choose another --out")
        if resume and not checkpoints:
            raise ValueError(f"nothing to resume in {str(self.run_dir)!r}: it has no complete checkpoint")
        torch.manual_seed(cfg.seed)

        self.data: TrainData = prepare_data(
            cfg.data, seq_len=cfg.seq_len, vocab_size=model_cfg.vocab_size, cache_dir=cfg.cache_dir,
            val_fraction=cfg.val_fraction, seed=cfg.seed, text_field=cfg.text_field, tokenizer_dir=cfg.tokenizer)
        mkdir(self.run_dir)  # only once the data is known to be usable
        ckpt = checkpoints[-1] if resume else None
        if ckpt is not None:
            self.model = load_pretrained(ckpt, device=self.device, dtype=torch.float32)
        else:
            self.model = build_model(model_cfg, device=self.device, dtype=torch.float32, seed=cfg.seed)
        self.model.train()
        self.moe = moe_layers(self.model)  # main stack first, then MTP blocks: router_out's order
        self.n_main_moe = sum(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_hidden_layers))
        blocks = [*self.model.model.layers, *(m.block for m in self.model.mtp)]
        self.moe_layer_ids = [i for i, block in enumerate(blocks) if block.mlp in self.moe]  # metrics labels
        self.optimizer = build_optimizer(self.model, cfg)
        self.sampler = BatchSampler(len(self.data.train), cfg.batch_size, cfg.seed)
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "skipped_steps": 0, "bad_in_a_row": 0,
                                      "elapsed_s": 0.0}
        if ckpt is not None:
            saved = load_trainer_state(ckpt, self.model, self.optimizer)
            self.sampler.load_state_dict(saved.pop("sampler"))
            self.state.update(saved)
        else:
            atomic_write_text(self.run_dir / TRAIN_CONFIG, json.dumps(cfg.to_dict(), indent=2))
        # transforms go on after loading: they wrap forward functions, never parameter names
        if cfg.precision == "fp8":  # the same Parameters in FP8-GEMM linears: optimizer and checkpoints unchanged
            print(convert_to_fp8_training(self.model).summary())
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if cfg.compile:
            apply_compile(self.model)
        self.autocast = autocast_context(self.device, cfg.precision)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.state["step"] if ckpt else None)

    # ---- one optimizer step ----------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> StepResult:
        """Loss of one micro-batch; its gradient, times `scale`, is accumulated into .grad."""
        cfg, model = self.cfg, self.model
        router_out: list = []
        with self.autocast or contextlib.nullcontext():
            hidden = model.hidden_states(x, router_out=router_out, capacity_factor=cfg.capacity_factor)
            ce = cross_entropy(model.lm_head(hidden), y)
            mtp = None
            if len(model.mtp) and cfg.mtp_weight > 0:
                mtp = mtp_loss(model.mtp_logits(hidden, x, router_out, cfg.capacity_factor), y)
        # this pass's routings; under activation checkpointing the backward recompute appends more later
        routings = router_out[:self.n_main_moe if mtp is None else len(self.moe)]
        loss = ce if mtp is None else ce + cfg.mtp_weight * mtp
        aux = None
        if cfg.aux_loss_alpha > 0 and routings:
            E, k = self.model_cfg.n_routed_experts, self.model_cfg.num_experts_per_tok
            aux = cfg.aux_loss_alpha * sum(sequence_balance_loss(r, x.shape[0], E, k) for r in routings)
            loss = loss + aux
        counts = expert_counts(routings, self.model_cfg.n_routed_experts) if routings else None
        (loss * scale).backward()
        return StepResult(_item(loss), _item(ce), _item(mtp), _item(aux), counts)

    def train_step(self) -> dict[str, Any]:
        cfg, step = self.cfg, self.state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        results = []
        for _ in range(cfg.grad_accum):
            x, y = self.data.train.batch(next(self.sampler))
            results.append(self.forward_backward(x.to(self.device), y.to(self.device), 1.0 / cfg.grad_accum))
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf, foreach=True))
        loss = _mean([r.loss for r in results])
        counts = None if results[0].counts is None else sum(r.counts for r in results)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.state["skipped_steps"] += 1
            self.state["bad_in_a_row"] += 1
        else:
            self.optimizer.step()
            if counts is not None and cfg.bias_update_rate > 0:
                update_bias(self.moe[:len(counts)], counts, cfg.bias_update_rate)
            self.state["bad_in_a_row"] = 0
        self.optimizer.zero_grad(set_to_none=True)
        tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
        dt = time.perf_counter() - t0
        self.state["step"] += 1
        self.state["tokens"] += tokens
        self.state["elapsed_s"] += dt
        record = {"kind": "train", "step": self.state["step"], "tokens": self.state["tokens"], "loss": loss,
                  "ce": _mean([r.ce for r in results]), "mtp_loss": _mean([r.mtp for r in results]),
                  "aux_loss": _mean([r.aux for r in results]), "lr": lr, "grad_norm": grad_norm,
                  "tok_per_s": tokens / dt, "elapsed_s": self.state["elapsed_s"], "skipped": skipped,
                  "moe_layers": self.moe_layer_ids[:0 if counts is None else len(counts)]}
        record.update(load_metrics(counts) if counts is not None else
                      {"max_vio": [], "min_share": [], "max_share": [], "dead_experts": [], "expert_share": []})
        self.metrics.write(record)
        if self.state["bad_in_a_row"] >= cfg.max_bad_steps:
            last = list_checkpoints(self.run_dir)
            raise TrainingError(
                f"loss or gradients were non-finite for {cfg.max_bad_steps} steps in a row (up to step "
                f"{self.state['step']}); stopping. Last good checkpoint: {str(last[-1]) if last else 'none'}. "
                "Lower --lr, raise --warmup-steps or check the data, then --resume.")
        return record

    # ---- evaluation, checkpoints, outputs ---------------------------------------------------------
    def validate(self, max_batches: int | None) -> dict[str, float]:
        return evaluate(self.model, self.data.val, self.cfg.batch_size, max_batches,
                        self.data.val_bytes_per_token, self.autocast)

    def log_validation(self, full: bool = False) -> dict[str, float]:
        """Periodic validation reads eval_batches fixed batches; `full` reads the whole split."""
        r = self.validate(None if full else self.cfg.eval_batches)
        self.metrics.write({"kind": "val", "step": self.state["step"], "tokens": self.state["tokens"],
                            "val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r.get("bpb"), "full": full})
        return r

    def save(self) -> Path:
        state = dict(self.state, sampler=self.sampler.state_dict())
        return save_checkpoint(self.run_dir, self.model, self.data.tokenizer, self.optimizer, self.cfg, state)

    def write_final(self) -> Path:
        final = self.run_dir / "final"
        tmp = mkdtemp(prefix=".final.", dir=self.run_dir)
        try:
            write_model_dir(tmp, self.model, self.data.tokenizer, self.cfg)
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def sample(self, prompt: str = SAMPLE_PROMPT) -> str:
        tok = self.data.tokenizer
        ids = torch.tensor([tok.encode(prompt)], device=self.device)
        self.model.eval()
        with self.autocast or contextlib.nullcontext():
            out = generate(self.model, ids, self.cfg.sample_tokens, eos_token_id=tok.eos_id)
        self.model.train()
        return tok.decode(out[0].tolist(), skip_special_tokens=True)


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False, echo=print) -> dict[str, Any]:
    """Run (or continue) training to cfg.steps; return the summary also written to RUN/summary.json."""
    from tqdm.auto import tqdm  # imported here: only a running training loop draws a progress bar

    trainer = Trainer(cfg, model_cfg, resume)
    run_dir, state = trainer.run_dir, trainer.state
    d = trainer.data
    echo(f"data      {cfg.data or 'python stdlib'}: {d.train_documents} train / {d.val_documents} val documents, "
         f"{len(d.train.tokens):,} / {len(d.val.tokens):,} tokens, vocab {d.tokenizer.vocab_size}")
    n = trainer.model.num_parameters()
    echo(f"model     {cfg.preset or cfg.model_config}: {n / 1e6:.2f}M parameters, device {cfg.device}, "
         f"{cfg.steps} steps of {cfg.grad_accum} x {cfg.batch_size} x {cfg.seq_len} tokens")
    if state["step"] >= cfg.steps and (run_dir / "summary.json").is_file():
        echo(f"the run in {str(run_dir)!r} is complete ({state['step']} steps); nothing to resume")
        trainer.metrics.close()
        return json.loads((run_dir / "summary.json").read_text())
    if state["step"]:
        echo(f"resuming  from step {state['step']} ({state['tokens']:,} tokens)")
    last_val: dict[str, float] | None = None
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not cfg.progress, unit="step", dynamic_ncols=True)
    with trainer.metrics, bar:
        while state["step"] < cfg.steps:
            r = trainer.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{r['ce']:.3f}" if r["ce"] is not None else "nan",
                            tok_s=f"{r['tok_per_s']:,.0f}", refresh=False)
            step = state["step"]
            if step % cfg.eval_every == 0 and step < cfg.steps:
                last_val = trainer.log_validation()
                bar.write(f"step {step:>6}  val loss {last_val['loss']:.4f}  bpb {last_val['bpb']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                trainer.save()
        # the final figures use the whole validation split, not the periodic subset
        last_val = trainer.log_validation(full=True)
    final = trainer.write_final()
    sample = trainer.sample() if cfg.sample_tokens else ""
    (run_dir / "sample.txt").write_text(sample)
    plots = []
    if cfg.plots:
        from .plots import write_plots
        plots = [p.name for p in write_plots(run_dir)]
    summary = {"steps": state["step"], "tokens": state["tokens"], "skipped_steps": state["skipped_steps"],
               "train_time_s": round(state["elapsed_s"], 1),
               "tokens_per_s": round(state["tokens"] / max(state["elapsed_s"], 1e-9)),
               "val_loss": last_val and last_val["loss"], "val_ppl": last_val and last_val["ppl"],
               "val_bpb": last_val and last_val.get("bpb"), "final": str(final), "plots": plots, "sample": sample}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
