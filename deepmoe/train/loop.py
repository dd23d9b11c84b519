"""The pretraining loop: DeepSeek's objective and balancing, observable, resumable bit for bit.

One optimizer step = grad_accum micro-batches of (B, T) tokens. Each micro-batch's loss is
    CE(main head) + λ · mean_k CE(MTP depth k) + α · Σ_layers sequence-balance loss
After the step, every noaux_tc router's correction bias moves by ±γ toward balance, from the loads
counted over the whole step. Non-finite losses or gradients skip the step (counted); too many in a row
stop the run, naming the last checkpoint from before the loss or gradient norm blew up (`health`), which
pruning keeps. On CPU the run is deterministic: stopping at a checkpoint and resuming gives the same
losses, bit for bit, as never stopping. A resume may change the optimizer and schedule; the change is
recorded in the config's history and in the metrics.

Launched by torchrun on more than one process, the same loop trains data parallel with FSDP2 and, with
--ep, expert parallel (deepmoe.parallel, docs/distributed.md): each rank reads its slice of the same global
batch, the figures logged are reduced over the ranks, rank 0 alone writes the run's files and every rank its
shards of each checkpoint (parallel/checkpoint.py); a run torchrun restarts resumes by itself (parallel/elastic.py).
With --pp the ranks are pipeline stages instead (parallel/pipeline_run.py): the step's micro-batches go through a
1F1B schedule, and the model each rank holds is its stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_pretrained, save_state
from ..config import ModelConfig
from ..data import BatchSampler
from ..durable import atomic_write_text, mkdir, mkdtemp, remove_dir, replace_dir
from ..generate import generate
from ..model import build_model
from ..model.router import RoutingLog
from ..parallel import checkpoint as sharded
from ..parallel.elastic import resolve_resume, restart_note
from ..parallel.mesh import Process, check_layout, init_distributed
from ..parallel.training import DataParallelRun, unsupported
from ..parallel.parallelize import ParallelConfig
from ..parallel.pipeline import pipeline_refusals
from .async_checkpoint import BackgroundSaves
from .balance import expert_counts, load_metrics, moe_layers, update_bias
from .compute_weights import ComputeWeights
from .config import TrainConfig, config_changes
from .data import TrainData, prepare_data
from .evaluate import evaluate
from .fp8 import convert_to_fp8_training
from .health import describe_blowup, last_sound_step, new_health, observe
from .fused_ce import linear_cross_entropy
from .losses import sequence_balance_loss
from .metrics import MetricsLog
from .optim import build_optimizer, lr_at, set_lr
from .state import (
    TRAIN_CONFIG,
    check_model_config,
    checkpoint_step,
    find_checkpoint,
    list_checkpoints,
    load_trainer_state,
    write_checkpoint_files,
    remove_interrupted_saves,
    save_checkpoint,
    write_model_dir,
    write_run_files,
)
from .transforms import apply_activation_checkpointing, apply_compile, autocast_context, eager, qat_summary

SAMPLE_PROMPT = "def "
SUMMARY = "summary.json"

log = logging.getLogger("deepmoe")


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


def step_loss(model, x: torch.Tensor, y: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                      torch.Tensor | None, torch.Tensor | None]:
    """One micro-batch's objective → (loss, ce, mtp, aux, expert counts (L, E) or None), all on the device.
    Every shape is static and nothing is read back to the host, so the whole forward and its backward
    compile as one graph (tested with fullgraph=True); capacity dropping (cfg.capacity_factor) is the
    exception, as its kept counts are data-dependent."""
    mc = model.config
    router_out = RoutingLog()  # not a plain list: it must survive FSDP's hooks (see RoutingLog)
    hidden = model.hidden_states(x, router_out=router_out, capacity_factor=cfg.capacity_factor)
    head = model.lm_head.weight  # the head runs inside the chunked loss: the logits never exist whole
    ce = linear_cross_entropy(hidden, head, y)
    mtp = None
    if len(model.mtp) and cfg.mtp_weight > 0:
        states = model.mtp_head_inputs(hidden, x, router_out, cfg.capacity_factor)
        # depth k's state at position i predicts token i+k+1, which is y[:, i+k]
        mtp = torch.stack([linear_cross_entropy(s, head, y[:, k:]) for k, s in enumerate(states, start=1)]).mean()
    # this pass's routings; under activation checkpointing the backward recompute appends more later
    n_main = sum(mc.is_moe_layer(i) for i in range(mc.num_hidden_layers))
    routings = router_out[:n_main if mtp is None else len(router_out)]
    loss = ce if mtp is None else ce + cfg.mtp_weight * mtp
    aux = None
    if cfg.aux_loss_alpha > 0 and routings:
        E, k = mc.n_routed_experts, mc.num_experts_per_tok
        aux = cfg.aux_loss_alpha * sum(sequence_balance_loss(r, x.shape[0], E, k) for r in routings)
        loss = loss + aux
    counts = expert_counts(routings, mc.n_routed_experts) if routings else None
    return loss, ce, mtp, aux, counts


def optimizer_update(model, optimizer: torch.optim.Optimizer, moe: list, counts: torch.Tensor | None, loss: float,
                     cfg, state: dict[str, Any], clip_grad_norm=None) -> tuple[float, bool]:
    """The end of a step, once its gradients are accumulated: clip them, then either skip the step (a
    non-finite loss or gradient norm: counted in state's skipped_steps and bad_in_a_row) or take the optimizer
    step and move the balancing bias by the step's expert counts. → (gradient norm, skipped).
    clip_grad_norm(params, max_norm) → norm: a distributed run's, over every rank's shards (default: torch's)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip_grad_norm is None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf, foreach=True))
    else:
        grad_norm = clip_grad_norm(params, cfg.grad_clip or math.inf)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if skipped:
        state["skipped_steps"] += 1
        state["bad_in_a_row"] += 1
    else:
        optimizer.step()
        if counts is not None and cfg.bias_update_rate > 0:
            update_bias(moe[:len(counts)], counts, cfg.bias_update_rate)
        state["bad_in_a_row"] = 0
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


class _NoLog:
    """The metrics log of ranks other than 0: they compute the same records and write none."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> _NoLog:
        return self

    def __exit__(self, *exc) -> None:
        pass


class Trainer:
    """`resume`: False starts a new run; True continues from the newest checkpoint; a checkpoint's name
    (`step-0000020`) or path continues from that one, deleting the later ones (they belong to the run that
    is being replaced: a plain resume must never pick them up again); "auto" continues if there is a
    checkpoint and starts otherwise, as a run restarted by torchrun does (parallel/elastic.py)."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, resume: bool | str | os.PathLike = False,
                 distributed: bool = False):
        """distributed: take the distributed path even on one process (a process group, the all-reduced figures
        and norm, DCP checkpoints; on one rank `parallelize` applies no FSDP): what
        benchmarks/train_throughput.py --force-distributed times against the plain path."""
        self.started = time.perf_counter()
        self.cfg, self.model_cfg = cfg, model_cfg
        self.run_dir = Path(cfg.out)
        self.device = torch.device(cfg.device)
        proc = Process.from_env()
        # set below when torchrun started more than one process (a PipelineRun with --pp)
        self.dist: DataParallelRun | None = None
        resume = resolve_resume(resume, self.run_dir)
        distributed = distributed or proc.world_size > 1
        if distributed or cfg.ep > 1 or cfg.pp > 1:
            moe = any(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_hidden_layers))
            check_layout(proc.world_size, cfg.ep, model_cfg.n_routed_experts if moe else None, proc.rank)
            refused = unsupported(cfg) + (pipeline_refusals(cfg, proc.world_size) if cfg.pp > 1 else [])
            if refused:
                raise ValueError(f"rank {proc.rank}: not available with more than one process or stage yet: "
                                 f"{'; '.join(refused)}")
            proc, self.device = init_distributed(cfg.device)
        self.is_main = proc.rank == 0
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints and not resume:
            raise ValueError(f"{str(self.run_dir)!r} already holds a run (checkpoints up to "
                             f"{checkpoints[-1].name}); pass --resume to continue it or choose another --out")
        if resume and not checkpoints:
            raise ValueError(f"nothing to resume in {str(self.run_dir)!r}: it has no complete checkpoint")
        ckpt = None
        if resume:
            ckpt = checkpoints[-1] if resume is True else find_checkpoint(self.run_dir, resume)
            check_model_config(ckpt, model_cfg)
        self.restart_note = restart_note(self.run_dir, ckpt)  # before the metrics log is cut back to ckpt
        torch.manual_seed(cfg.seed)

        if proc.world_size > 1 and not self.is_main:
            torch.distributed.barrier()  # rank 0 trains the tokenizer and fills the token cache first
        self.data: TrainData = prepare_data(
            cfg.data, seq_len=cfg.seq_len, vocab_size=model_cfg.vocab_size, cache_dir=cfg.cache_dir,
            val_fraction=cfg.val_fraction, seed=cfg.seed, text_field=cfg.text_field, tokenizer_dir=cfg.tokenizer)
        if proc.world_size > 1 and self.is_main:
            torch.distributed.barrier()
        if self.is_main:
            mkdir(self.run_dir)  # only once the data is known to be usable
            remove_interrupted_saves(self.run_dir)
        if ckpt is not None and not sharded.is_sharded(ckpt):
            self.model = load_pretrained(ckpt, device=self.device, dtype=torch.float32)
        else:
            self.model = build_model(model_cfg, device=self.device, dtype=torch.float32, seed=cfg.seed)
        self.model.train()
        self.autocast = autocast_context(self.device, cfg.precision)
        self.moe = moe_layers(self.model)  # main stack first, then MTP blocks: router_out's order
        blocks = [*self.model.model.layers, *(m.block for m in self.model.mtp)]
        self.moe_layer_ids = [i for i, block in enumerate(blocks) if block.mlp in self.moe]  # metrics labels
        if distributed:  # before the optimizer, which must hold the sharded parameters
            if cfg.activation_checkpointing:
                apply_activation_checkpointing(self.model)
            if cfg.pp > 1:  # this rank keeps its stage of the model, and balances its stage's MoE layers
                from ..parallel.pipeline_run import PipelineRun  # torch.distributed.pipelining: ~1 s to import

                self.dist = PipelineRun(proc, self.device, self.model, cfg)
                self.model, self.moe = self.dist.model, self.dist.moe_layers
            else:
                # FSDP's gathered bf16 weights play the part of the single-device bf16 compute copies
                dtype = torch.bfloat16 if self.autocast is not None else torch.float32
                self.dist = DataParallelRun(proc, self.device, self.model, ParallelConfig(cfg.ep, dtype),
                                            cfg.batch_size)
        self.optimizer = build_optimizer(self.model, cfg)
        self.sampler = BatchSampler(len(self.data.train), cfg.batch_size, cfg.seed)
        self.saves = BackgroundSaves()  # with cfg.async_checkpoint; idle otherwise
        # elapsed_s: time in optimizer steps; wall_s: time of the whole run up to the last save
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "skipped_steps": 0, "bad_in_a_row": 0,
                                      "elapsed_s": 0.0, "wall_s": 0.0, "health": new_health()}
        if ckpt is not None:  # a sharded checkpoint's weights too; on any world size, resharded
            if self.dist is None and not sharded.is_sharded(ckpt):
                saved = load_trainer_state(ckpt, self.model, self.optimizer)
            else:
                saved = sharded.load_checkpoint(ckpt, self.model, self.optimizer, model_cfg)
            self.sampler.load_state_dict(saved.pop("sampler"))
            self.state.update(saved)
        self.wall_before = self.state["wall_s"]  # what the sessions before this one took
        self.complete = ckpt is not None and self.state["step"] >= cfg.steps and (self.run_dir / SUMMARY).is_file()
        self.changes: dict[str, dict[str, Any]] = {}
        if ckpt is None:
            if self.is_main:
                atomic_write_text(self.run_dir / TRAIN_CONFIG, json.dumps(cfg.to_dict(), indent=2))
        elif not self.complete:
            self._continue_from(ckpt, checkpoints)
        # transforms go on after loading: they wrap forward functions, never parameter names
        if cfg.precision == "fp8":  # the same Parameters in FP8-GEMM linears: optimizer and checkpoints unchanged
            print(convert_to_fp8_training(self.model).summary())
        if cfg.qat:  # the same Parameters, fake-quantised in the forward pass
            print(qat_summary(self.model, cfg))
        if cfg.activation_checkpointing and self.dist is None:
            apply_activation_checkpointing(self.model)
        if cfg.compile:
            apply_compile(self.model)
        # bf16 compute copies of the matmul weights over the fp32 masters, wherever the matmuls run in bf16
        fsdp = self.dist is not None and getattr(self.dist, "sharded", True)  # FSDP gathers bf16 weights itself
        self.compute = ComputeWeights(self.model) if self.autocast is not None and not fsdp else None
        if self.complete:
            self.metrics = None  # nothing will be logged, and the log is left as the run finished it
            return
        if not self.is_main:
            self.metrics = _NoLog()
            return
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.state["step"] if ckpt else None)
        if self.changes:
            self.metrics.write({"kind": "config", "step": self.state["step"], "tokens": self.state["tokens"],
                                "changes": self.changes})

    def _continue_from(self, ckpt: Path, checkpoints: list[Path]) -> None:
        """Drop the checkpoints after `ckpt`, and record what this resume changes in the run's config."""
        later = checkpoints[checkpoints.index(ckpt) + 1:]
        for c in later if self.is_main else []:
            remove_dir(c)
        if later:
            log.info("continuing from %s: removed the later checkpoint(s) %s", ckpt.name,
                     ", ".join(c.name for c in later))
        run_cfg = self.run_dir / TRAIN_CONFIG
        saved = TrainConfig.from_json(run_cfg if run_cfg.is_file() else ckpt / TRAIN_CONFIG)
        self.changes = config_changes(saved, self.cfg)
        history = saved.history + ([{"step": self.state["step"], "changes": self.changes}] if self.changes else [])
        self.cfg = dataclasses.replace(self.cfg, history=history)
        # rewritten even without changes: a copied run gets its own location
        if self.is_main:
            atomic_write_text(run_cfg, json.dumps(self.cfg.to_dict(), indent=2))

    # ---- one optimizer step ----------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> StepResult:
        """Loss of one micro-batch; its gradient, times `scale`, is accumulated into .grad."""
        with self.computing():
            with self.autocast or contextlib.nullcontext():
                loss, ce, mtp, aux, counts = step_loss(self.model, x, y, self.cfg)
            (loss * scale).backward()
        return StepResult(_item(loss), _item(ce), _item(mtp), _item(aux), counts)

    def computing(self):
        """The weights the model computes with: the bf16 copies under mixed precision, else the parameters."""
        return self.compute.active() if self.compute is not None else contextlib.nullcontext()

    def train_step(self) -> dict[str, Any]:
        cfg, step = self.cfg, self.state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        if cfg.pp > 1:  # every micro-batch through the stages in one schedule; figures and counts come reduced
            batches = [self.data.train.batch(next(self.sampler)) for _ in range(cfg.grad_accum)]
            figures, counts = self.dist.step(batches, self.autocast)
        else:
            results = []
            for _ in range(cfg.grad_accum):
                indices = next(self.sampler)  # the global batch; a distributed rank reads its slice of it
                x, y = self.data.train.batch(indices if self.dist is None else self.dist.local_indices(indices))
                results.append(self.forward_backward(x.to(self.device), y.to(self.device), 1.0 / cfg.grad_accum))
            figures = [_mean([getattr(r, f) for r in results]) for f in ("loss", "ce", "mtp", "aux")]
            counts = None if results[0].counts is None else sum(r.counts for r in results)
            if self.dist is not None:  # global means and counts: every rank logs, skips and balances alike
                figures, counts = self.dist.reduce_step(figures, counts)
        clip = None if self.dist is None else self.dist.clip_grad_norm
        loss, ce, mtp, aux = figures
        grad_norm, skipped = optimizer_update(self.model, self.optimizer, self.moe, counts, loss, cfg, self.state,
                                              clip)
        if self.compute is not None and not skipped:
            self.compute.refresh()
        if self.device.type == "cuda":  # the optimizer step is still queued: count it in this step's time
            torch.cuda.synchronize(self.device)
        tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
        dt = time.perf_counter() - t0
        self.state["health"] = observe(self.state["health"], step + 1, loss, grad_norm)
        self.state["step"] += 1
        self.state["tokens"] += tokens
        self.state["elapsed_s"] += dt
        record = {"kind": "train", "step": self.state["step"], "tokens": self.state["tokens"], "loss": loss,
                  "ce": ce, "mtp_loss": mtp, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm,
                  "tok_per_s": tokens / dt, "elapsed_s": self.state["elapsed_s"], "skipped": skipped,
                  "moe_layers": self.moe_layer_ids[:0 if counts is None else len(counts)],
                  "num_hidden_layers": self.model_cfg.num_hidden_layers}  # moe_layers from here on are MTP blocks
        record.update(load_metrics(counts) if counts is not None else
                      {"max_vio": [], "min_share": [], "max_share": [], "dead_experts": [], "expert_share": []})
        self.metrics.write(record)
        if self.state["bad_in_a_row"] >= cfg.max_bad_steps:
            raise TrainingError(self._divergence_message())
        return record

    def _divergence_message(self) -> str:
        self.saves.settle()  # the checkpoint in flight may be the one to name
        cfg, health = self.cfg, self.state["health"]
        head = (f"loss or gradients were non-finite for {cfg.max_bad_steps} steps in a row (up to step "
                f"{self.state['step']}); stopping. The run blew up {describe_blowup(health)}.")
        sound = [c for c in list_checkpoints(self.run_dir) if checkpoint_step(c) <= last_sound_step(health)]
        if not sound:
            return (f"{head} No checkpoint from before that is left: start a new run (another --out, or delete "
                    f"this one) with a lower --lr (it was {cfg.lr:g}) or a longer --warmup-steps (it was "
                    f"{cfg.warmup_steps}), or check the data.")
        return (f"{head} The last checkpoint from before it is {sound[-1]}. Continue from it with a lower --lr "
                f"(it was {cfg.lr:g}) or a longer --warmup-steps (it was {cfg.warmup_steps}), or check the data; e.g. "
                f"deepmoe train --out {self.run_dir} --resume {sound[-1].name} --lr {cfg.lr / 10:g}")

    # ---- evaluation, checkpoints, outputs ---------------------------------------------------------
    def validate(self, max_batches: int | None) -> dict[str, float]:
        with self.computing():
            return evaluate(self.model, self.data.val, self.cfg.batch_size, max_batches,
                            self.data.val_bytes_per_token, self.autocast,
                            self.dist.batch_loss if self.cfg.pp > 1 else None)

    def log_validation(self, full: bool = False) -> dict[str, float]:
        """Periodic validation reads eval_batches fixed batches; `full` reads the whole split."""
        r = self.validate(None if full else self.cfg.eval_batches)
        self.metrics.write({"kind": "val", "step": self.state["step"], "tokens": self.state["tokens"],
                            "val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r.get("bpb"), "full": full})
        return r

    def wall_time(self) -> float:
        """Seconds this run has taken, over every session that led to the current state."""
        return self.wall_before + time.perf_counter() - self.started

    def save(self) -> Path:
        """Checkpoint this step. With cfg.async_checkpoint this returns once the snapshot is in host memory,
        before the files are written (self.saves.wait() for them)."""
        self.state["wall_s"] = self.wall_time()
        state = dict(self.state, sampler=self.sampler.state_dict())
        # while blowing up, keep the checkpoint to come back to however many newer ones are saved
        keep = last_sound_step(self.state["health"])
        if self.dist is not None:  # every rank writes its shards (parallel/checkpoint.py), in the loop
            return sharded.save_checkpoint(
                self.run_dir, self.model, self.optimizer, state, keep=self.cfg.keep_checkpoints, also_keep_up_to=keep,
                write_files=lambda tmp: write_checkpoint_files(tmp, self.model_cfg, self.data.tokenizer, self.cfg))
        if self.cfg.async_checkpoint:
            return self.saves.save(self.run_dir, self.model, self.optimizer, self.data.tokenizer, self.cfg, state,
                                   also_keep_up_to=keep)
        return save_checkpoint(self.run_dir, self.model, self.data.tokenizer, self.optimizer, self.cfg, state,
                               also_keep_up_to=keep)

    def write_final(self) -> Path:
        self.saves.wait()  # the last checkpoint first: a run whose final/ exists has all its checkpoints
        final = self.run_dir / "final"
        tmp = mkdtemp(prefix=".final.", dir=self.run_dir) if self.is_main else None
        try:
            if self.dist is None:
                write_model_dir(tmp, self.model, self.data.tokenizer, self.cfg)
            elif self.cfg.pp > 1:  # each stage holds whole tensors of its own: rank 0 receives them all
                weights = self.dist.model_state(self.model)
                if self.is_main:
                    save_state(weights, self.model_cfg, tmp)
                    write_run_files(tmp, self.data.tokenizer, self.cfg)
            else:  # every rank gathers, a shard at a time; rank 0 writes
                sharded.export_pretrained(self.model, tmp)
                if self.is_main:
                    write_run_files(tmp, self.data.tokenizer, self.cfg)
            if self.is_main:
                replace_dir(tmp, final)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def sample(self, prompt: str = SAMPLE_PROMPT) -> str:
        tok = self.data.tokenizer
        ids = torch.tensor([tok.encode(prompt)], device=self.device)
        self.model.eval()
        with self.computing(), self.autocast or contextlib.nullcontext(), eager():
            if self.cfg.pp > 1:
                out = self.dist.generate(ids, self.cfg.sample_tokens, eos_token_id=tok.eos_id)
            else:
                out = generate(self.model, ids, self.cfg.sample_tokens, eos_token_id=tok.eos_id)
        self.model.train()
        return tok.decode(out[0].tolist(), skip_special_tokens=True)


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool | str | os.PathLike = False, echo=print
          ) -> dict[str, Any] | None:
    """Run (or continue, see `Trainer`) training to cfg.steps; return the summary also written to RUN/summary.json
    (None on the ranks other than 0 of a distributed run)."""
    from tqdm.auto import tqdm  # imported here: only a running training loop draws a progress bar

    trainer = Trainer(cfg, model_cfg, resume)
    try:
        return _run(trainer, echo if trainer.is_main else lambda *a, **k: None, tqdm)
    finally:
        if trainer.dist is not None:
            trainer.dist.close()


def _run(trainer: Trainer, echo, tqdm) -> dict[str, Any] | None:
    cfg, run_dir, state = trainer.cfg, trainer.run_dir, trainer.state
    d = trainer.data
    echo(f"data      {cfg.data or 'python stdlib'}: {d.train_documents} train / {d.val_documents} val documents, "
         f"{len(d.train.tokens):,} / {len(d.val.tokens):,} tokens, vocab {d.tokenizer.vocab_size}")
    n = trainer.model.num_parameters()
    echo(f"model     {cfg.preset or cfg.model_config}: {n / 1e6:.2f}M parameters, device {cfg.device}, "
         f"{cfg.steps} steps of {cfg.grad_accum} x {cfg.batch_size} x {cfg.seq_len} tokens")
    if trainer.complete:
        echo(f"the run in {str(run_dir)!r} is complete ({state['step']} steps); nothing to resume")
        summary = json.loads((run_dir / SUMMARY).read_text())
        # this copy's own files, wherever the run was when it finished (it may have been copied or moved since)
        summary["final"] = str(run_dir / "final")
        if "step_time_s" not in summary:  # written before wall and step time were told apart: a lower bound
            summary["step_time_s"] = summary["wall_time_s"] = summary.pop("train_time_s")
        return summary
    if trainer.restart_note:
        echo(f"restart   {trainer.restart_note}")
    if state["step"]:
        echo(f"resuming  from step {state['step']} ({state['tokens']:,} tokens)")
    for name, change in trainer.changes.items():
        echo(f"changed   {name} {change['from']} -> {change['to']} from step {state['step']} on "
             f"(recorded in {run_dir / TRAIN_CONFIG})")
    last_val: dict[str, float] | None = None
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not (cfg.progress and trainer.is_main), unit="step",
               dynamic_ncols=True)
    try:
        with trainer.metrics:
            with bar:
                while state["step"] < cfg.steps:
                    r = trainer.train_step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{r['ce']:.3f}" if r["ce"] is not None else "nan",
                                    tok_s=f"{r['tok_per_s']:,.0f}", refresh=False)
                    step = state["step"]
                    if step == cfg.steps:
                        # closing draws the bar one last time, with its overall rate: close it before the last
                        # checkpoint and the final validation so that they do not count as time per step
                        bar.close()
                    if step % cfg.eval_every == 0 and step < cfg.steps:
                        last_val = trainer.log_validation()
                        if trainer.is_main:
                            bar.write(f"step {step:>6}  val loss {last_val['loss']:.4f}  bpb {last_val['bpb']:.4f}")
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                        trainer.save()
            # the final figures use the whole validation split, not the periodic subset (while the last
            # checkpoint is written)
            last_val = trainer.log_validation(full=True)
        final = trainer.write_final()
    except BaseException:  # a crash, a divergence, Ctrl-C: the checkpoint in flight still reaches the disk
        trainer.saves.settle()
        raise
    sample = trainer.sample() if cfg.sample_tokens else ""  # every rank: the model's forward is collective
    if not trainer.is_main:
        return None  # rank 0 reports
    atomic_write_text(run_dir / "sample.txt", sample)
    plots = []
    if cfg.plots:
        from .plots import write_plots
        plots = [p.name for p in write_plots(run_dir)]
    summary = {"steps": state["step"], "tokens": state["tokens"], "skipped_steps": state["skipped_steps"],
               "wall_time_s": round(trainer.wall_time(), 1), "step_time_s": round(state["elapsed_s"], 1),
               "tokens_per_s": round(state["tokens"] / max(state["elapsed_s"], 1e-9)),
               "val_loss": last_val and last_val["loss"], "val_ppl": last_val and last_val["ppl"],
               "val_bpb": last_val and last_val.get("bpb"), "final": str(final), "plots": plots, "sample": sample}
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2))
    return summary
