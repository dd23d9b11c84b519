"""`deepmoe grpo`: R1-Zero-style reinforcement learning with rule rewards, rollouts from the engine in-process.

One step:
  1. draw P prompts (a built-in task's training problems, or a JSONL of prompts);
  2. sample G completions of each through deepmoe's engine, running on a copy of the current weights that
     is re-synced after every optimizer step (posttrain.rollout), each drawn with a seed fixed by (run
     seed, step, prompt): a resumed run draws the very same rollouts;
  3. score them with the reward functions (posttrain.rewards) and turn the rewards into group-relative
     advantages (posttrain.grpo_loss.group_advantages);
  4. take num_iterations optimizer steps on the clipped policy objective (posttrain.grpo_loss), the
     completions split into grad_accum micro-batches. The rollout policy's log-probabilities ("old") come
     from the training forward itself: detached from the first iteration's graph when there is one
     iteration (the ratio is then 1 in value and only its gradient acts), from a no-grad pass before the
     first update otherwise. The engine's own log-probabilities of the sampled tokens are compared with
     them each step (`logprob_mismatch`), which shows what bf16 decoding changes on a GPU.

Everything else is SFT's loop (deepmoe.posttrain.sft.run): schedule, checkpoints, --resume, metrics.jsonl,
accuracy before and after through the engine. What a step reports, per step in metrics.jsonl: reward
mean/std (and per reward function), accuracy, the share of groups whose rewards were all equal (they teach
nothing: their advantages are 0), KL to the reference, how often the clip was active, completion length and
truncation, entropy, rollout vs training tokens/s.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_pretrained
from ..engine.sequence import SamplingParams
from ..model import DeepSeekModel
from ..tasks import CORRECT, MALFORMED
from ..tasks.evaluate import prompt_ids
from ..train.loop import TrainingError, optimizer_update
from ..train.optim import lr_at, set_lr
from ..train.state import list_checkpoints
from .config import GRPOConfig
from .data import BAD_LINE_POLICIES, DataError, SFTDataset, ensure_chat_template
from .grpo_loss import group_advantages, policy_loss_terms, token_logprobs, token_weights, zero_std_fraction
from .losses import masked_expert_counts
from .rewards import Reward, combine, load_reward, task_reward
from .rollout import Rollout, RolloutEngine
from .sft import ModelHook, SFTTrainer, engine_dtype, run

NO_SIGNAL_WARN_EVERY = 20  # steps between repeated warnings that no group had a reward spread


@dataclass
class PromptSet:
    """The prompts GRPO samples from: token ids (as the engine gets them), their text (as reward functions
    get them) and the records' other fields as columns."""
    ids: list[list[int]]
    texts: list[str]
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class GRPOData:
    train: PromptSet
    val: None = None
    notes: list[str] = field(default_factory=list)


def task_prompts(task, tokenizer, n: int, seed: int) -> PromptSet:
    problems = task.problems("train", n, seed)
    ids = [prompt_ids(tokenizer, p) for p in problems]
    return PromptSet(ids, [tokenizer.decode(i) for i in ids],
                     {"question": [p.question for p in problems], "answer": [p.answer for p in problems]})


def read_prompts(path: str, tokenizer, on_bad_line: str = "stop") -> tuple[PromptSet, list[str]]:
    """Prompts from JSONL: {"prompt": text} (encoded as is) or {"messages": [...]} (rendered with the chat
    template, ready for the assistant's reply); every other field is a column for the reward functions."""
    if on_bad_line not in BAD_LINE_POLICIES:
        raise ValueError(f"on_bad_line must be one of {', '.join(BAD_LINE_POLICIES)}")
    ids, texts, rows, notes = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise DataError(f"expected a JSON object, got {type(obj).__name__}")
                if isinstance(obj.get("prompt"), str):
                    text = obj["prompt"]
                elif isinstance(obj.get("messages"), list) and obj["messages"]:
                    messages = obj["messages"]
                    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                        raise DataError("every message needs a string 'content'")
                    if messages[-1].get("role") == "assistant":
                        raise DataError("the conversation ends with an assistant turn; GRPO samples that turn")
                    ensure_chat_template(tokenizer)
                    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                else:
                    raise DataError("expected a string 'prompt' or a non-empty 'messages' list")
                if not text:
                    raise DataError("the prompt is empty")
            except (ValueError, DataError) as e:
                if on_bad_line == "stop":
                    raise DataError(f"{where}: {e}") from None
                notes.append(f"skipped {where}: {e}")
                continue
            ids.append(tokenizer.encode(text))
            texts.append(text)
            rows.append({k: v for k, v in obj.items() if k not in ("prompt", "messages")})
    keys = sorted({k for r in rows for k in r})
    return PromptSet(ids, texts, {k: [r.get(k) for r in rows] for k in keys}), notes


def rollout_seeds(seed: int, step: int, n: int) -> list[int]:
    """One sampling seed per prompt of a step, fixed by (run seed, step); each leaves room for the
    generations' offsets (the engine draws generation k of a prompt with seed + k)."""
    return (np.random.default_rng([seed, step, 0x5EED]).integers(0, 2**61, size=n) * 64).tolist()


def rollout_batch(rollouts: list[Rollout], mask_truncated: bool):
    """The rollouts as a padded training batch (prompt + completion, the completion's tokens trained on)."""
    examples = []
    for r in rollouts:
        keep = not (mask_truncated and r.finish_reason == "length")
        examples.append((r.prompt_ids + r.token_ids, [False] * len(r.prompt_ids) + [keep] * len(r.token_ids)))
    return SFTDataset.from_examples(examples, pad_id=0)


class GRPOTrainer(SFTTrainer):
    cfg: GRPOConfig

    def __init__(self, cfg: GRPOConfig, resume: bool = False, model_hook: ModelHook | None = None):
        self.rollout: RolloutEngine | None = None

        def hook(model: DeepSeekModel) -> None:
            if model_hook is not None:
                model_hook(model)
            from ..lora.apply import lora_layers

            if next(lora_layers(model), None) is not None:
                raise ValueError("GRPO's rollout engine syncs plain weights; a model with LoRA adapters is not "
                                 "supported here (merge the adapter first: deepmoe merge)")
            # the engine's copy is taken here: after loading, before training transforms wrap the blocks
            n_seqs = cfg.batch_size * cfg.num_generations
            self.rollout = RolloutEngine(model, self.tokenizer, engine_dtype(cfg.device), max_num_seqs=n_seqs,
                                         max_num_batched_tokens=max(4096, cfg.seq_len),
                                         kv_cache_bytes=self.cache_bytes(model, n_seqs))

        super().__init__(cfg, resume, hook)
        self.rewards = self.build_rewards()
        self.reference: DeepSeekModel | None = None
        if cfg.beta > 0:  # the frozen starting point, also on resume
            self.reference = load_pretrained(cfg.model, device=self.device, dtype=torch.float32,
                                             load_mtp=False).eval().requires_grad_(False)
        self.state.setdefault("no_signal_steps", 0)
        self.final_accuracy: dict[str, Any] | None = None
        self.eval_problems = (self.task.problems("test", cfg.eval_problems, cfg.seed)
                              if self.task is not None and cfg.eval_problems else [])

    def cache_bytes(self, model: DeepSeekModel, n_seqs: int) -> int:
        """A paged cache for one rollout batch at its longest (every prompt at the longest prompt's length,
        every completion at max_new_tokens), with a quarter more for block rounding and evaluation batches.
        Not the engine's default: on CUDA that takes most of the free memory, which the training step
        that follows each rollout needs."""
        from ..engine.kv_cache import bytes_per_block

        block = 16
        longest = max(map(len, self.data.train.ids)) + self.cfg.max_new_tokens
        blocks = n_seqs * -(-longest // block)
        return int(1.25 * blocks) * bytes_per_block(model.config, block, engine_dtype(self.cfg.device))

    # ---- data and rewards --------------------------------------------------------------------------
    def build_data(self) -> GRPOData:
        cfg = self.cfg
        room = cfg.seq_len + 1 - cfg.max_new_tokens  # prompt + completion must fit one training row
        if room < 1:
            raise ValueError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in seq_len {cfg.seq_len}")
        if self.task is not None:
            prompts, notes = task_prompts(self.task, self.tokenizer, cfg.task_examples, cfg.seed), []
            source = f"task {cfg.task}"
        else:
            prompts, notes = read_prompts(cfg.data, self.tokenizer, cfg.on_bad_line)
            source = cfg.data
        keep = [i for i, ids in enumerate(prompts.ids) if len(ids) <= room]
        if len(keep) < len(prompts):
            notes.append(f"skipped {len(prompts) - len(keep)} prompts longer than {room} tokens (seq_len "
                         f"{cfg.seq_len} minus max_new_tokens {cfg.max_new_tokens})")
            prompts = PromptSet([prompts.ids[i] for i in keep], [prompts.texts[i] for i in keep],
                                {k: [v[i] for i in keep] for k, v in prompts.columns.items()})
        if len(prompts) < cfg.batch_size:
            raise DataError(f"{source} gives {len(prompts)} usable prompts, fewer than --batch-size {cfg.batch_size}")
        return GRPOData(prompts, None, notes)

    def build_rewards(self) -> list[Reward]:
        cfg = self.cfg
        named = ([(cfg.task.partition(":")[0], task_reward(self.task))] if self.task is not None else [])
        named += [(spec, load_reward(spec)) for spec in cfg.rewards]
        weights = cfg.reward_weights or (1.0,) * len(named)
        return [Reward(name, fn, float(w)) for (name, fn), w in zip(named, weights, strict=True)]

    def describe_data(self, echo) -> None:
        cfg = self.cfg
        echo(f"data      {cfg.data or 'task ' + cfg.task}: {len(self.data.train)} prompts; {cfg.batch_size} per step x "
             f"{cfg.num_generations} generations, up to {cfg.max_new_tokens} new tokens at temperature {cfg.temperature}")
        echo(f"rewards   {', '.join(f'{r.name} (x{r.weight:g})' for r in self.rewards)}")
        echo(f"objective loss {cfg.loss_type}, advantages scaled by {cfg.scale_rewards}, clip "
             f"[{1 - cfg.epsilon:g}, {1 + (cfg.epsilon_high or cfg.epsilon):g}], beta {cfg.beta:g}, "
             f"{cfg.num_iterations} optimizer step(s) per rollout batch")
        for note in self.data.notes:
            echo(f"note      {note}")

    # ---- one step ----------------------------------------------------------------------------------
    def generate(self, indices: list[int], step: int) -> list[Rollout]:
        cfg = self.cfg
        prompts = [self.data.train.ids[i] for i in indices]
        params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_new_tokens)
        groups = self.rollout.generate(prompts, cfg.num_generations, params, rollout_seeds(cfg.seed, step, len(indices)),
                                       want_logprobs=cfg.temperature == 1.0)
        return [r for g in groups for r in g]

    def score(self, indices: list[int], rollouts: list[Rollout]) -> tuple[torch.Tensor, dict[str, Any]]:
        G, P = self.cfg.num_generations, len(indices)
        rows = [i for i in indices for _ in range(G)]
        prompts = self.data.train
        totals, per_fn = combine(self.rewards, [prompts.texts[i] for i in rows], [r.text for r in rollouts],
                                 {k: [v[i] for i in rows] for k, v in prompts.columns.items()})
        rewards = torch.tensor(totals, dtype=torch.float32).view(P, G)
        stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                 "frac_reward_zero_std": zero_std_fraction(rewards)}
        for name, values in per_fn.items():
            applicable = [v for v in values if v is not None]
            stats[f"reward/{name}"] = sum(applicable) / len(applicable) if applicable else None
        if self.task is not None:
            task_values = per_fn[self.rewards[0].name]
            stats["accuracy"] = sum(v == CORRECT for v in task_values) / len(task_values)
            stats["well_formed"] = sum(v > MALFORMED for v in task_values) / len(task_values)
        return rewards, stats

    def _logprobs(self, model: DeepSeekModel, b, chunk: int, router_out: list | None = None):
        hidden = model.hidden_states(b.x, router_out=router_out, capacity_factor=self.cfg.capacity_factor)
        return token_logprobs(hidden[b.target], model.lm_head.weight, b.y[b.target], self.cfg.temperature, chunk)

    def train_step(self) -> dict[str, Any]:
        cfg, st, model = self.cfg, self.state, self.model
        step = st["step"]
        t0 = time.perf_counter()
        indices = next(self.sampler)
        rollouts = self.generate(indices, step)
        t_rollout = time.perf_counter() - t0
        rewards, stats = self.score(indices, rollouts)
        advantages = group_advantages(rewards, cfg.scale_rewards).flatten()  # one per completion
        data = rollout_batch(rollouts, cfg.mask_truncated)
        N = len(rollouts)
        full = data.batch(range(N))
        weights = token_weights(full.target, cfg.loss_type, cfg.max_new_tokens)
        micro = [torch.as_tensor(idx) for idx in np.array_split(np.arange(N), min(cfg.grad_accum, N))]
        batches = []
        for idx in micro:  # rows are right-padded: a micro-batch's columns are a prefix of the full batch's
            b = data.batch(idx.tolist()).to(self.device)
            batches.append((b, advantages[idx].to(self.device), weights[idx, :b.target.shape[1]].to(self.device)))
        ctx = self.autocast or contextlib.nullcontext()

        # log-probabilities that do not depend on the update: the rollout policy's (when it takes several
        # steps) and the reference's
        old, ref = [None] * len(batches), [None] * len(batches)
        with torch.no_grad(), ctx:
            for j, (b, _, _) in enumerate(batches):
                if cfg.num_iterations > 1:
                    old[j] = self._logprobs(model, b, cfg.logprob_chunk)[0]
                if self.reference is not None:
                    ref[j] = self._logprobs(self.reference, b, cfg.logprob_chunk)[0]

        t1 = time.perf_counter()
        n_loss_tokens = int(full.target.sum())
        sums: dict[str, float] = {}
        mismatch = []
        for it in range(cfg.num_iterations):
            lr = self.lr_for(step)
            loss_total, counts = 0.0, None
            sums = {"clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "entropy": 0.0, "ratio": 0.0}
            for j, (b, adv, w) in enumerate(batches):
                router_out: list = []
                with ctx:
                    logp, entropy = self._logprobs(model, b, cfg.logprob_chunk, router_out)
                    rows = b.target.nonzero()[:, 0]
                    old_j = logp.detach() if old[j] is None else old[j]
                    terms, diag = policy_loss_terms(logp, old_j, adv[rows], ref[j], cfg.epsilon, cfg.epsilon_high,
                                                    cfg.beta)
                    loss = (terms * w[b.target]).sum()
                loss.backward()
                loss_total += float(loss.detach())
                for k, v in diag.items():
                    sums[k] += float(v.sum())
                sums["entropy"] += float(entropy.sum())
                sums["ratio"] += float(torch.exp(logp.detach() - old_j).sum())
                if it == 0 and rollouts[0].logprobs is not None:
                    mismatch.append(self._engine_mismatch(micro[j].tolist(), rollouts, logp.detach(), b))
                if cfg.bias_update_rate > 0 and router_out:
                    c = masked_expert_counts(router_out[:len(self.moe)], [b.valid] * len(self.moe),
                                             model.config.n_routed_experts)
                    counts = c if counts is None else counts + c
            grad_norm, skipped = optimizer_update(model, self.optimizer, self.moe, counts, loss_total, cfg, st)
        t_train = time.perf_counter() - t1
        sync_s = self.rollout.sync(model)
        dt = time.perf_counter() - t0

        lengths = [len(r.token_ids) for r in rollouts]
        real = int(full.valid.sum())
        st["step"] += 1
        st["tokens"] += real * cfg.num_iterations
        st["target_tokens"] += n_loss_tokens * cfg.num_iterations
        st["elapsed_s"] += dt
        no_signal = stats["frac_reward_zero_std"] == 1.0
        st["no_signal_steps"] += no_signal
        denom = max(n_loss_tokens, 1)
        record = {"kind": "train", "step": st["step"], "tokens": st["tokens"], "target_tokens": st["target_tokens"],
                  "loss": loss_total, **stats, "advantage_abs": float(advantages.abs().mean()),
                  "completion_len": sum(lengths) / N, "completion_len_max": max(lengths),
                  "truncated": sum(r.finish_reason == "length" for r in rollouts) / N,
                  "entropy": sums["entropy"] / denom, "ratio": sums["ratio"] / denom,
                  "clip_low": sums["clip_low"] / denom, "clip_high": sums["clip_high"] / denom,
                  "clip_fraction": (sums["clip_low"] + sums["clip_high"]) / denom,
                  "kl": sums["kl"] / denom if self.reference is not None else None,
                  "logprob_mismatch": float(np.mean(mismatch)) if mismatch else None,
                  "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
                  "rollout_tok_per_s": sum(lengths) / max(t_rollout, 1e-9),
                  "tok_per_s": real * cfg.num_iterations / max(t_train, 1e-9),
                  "rollout_s": t_rollout, "train_s": t_train, "sync_s": sync_s, "elapsed_s": st["elapsed_s"],
                  "no_signal": no_signal}
        self.metrics.write(record)
        if st["bad_in_a_row"] >= cfg.max_bad_steps:
            last = list_checkpoints(self.run_dir)
            raise TrainingError(
                f"loss or gradients were non-finite for {cfg.max_bad_steps} steps in a row (up to step {st['step']}); "
                f"stopping. Last good checkpoint: {str(last[-1]) if last else 'none'}. Lower --lr, then --resume.")
        return record

    def lr_for(self, step: int) -> float:
        lr = lr_at(step, self.cfg)
        set_lr(self.optimizer, lr)
        return lr

    @staticmethod
    def _engine_mismatch(rows, rollouts: list[Rollout], logp: torch.Tensor, b) -> float:
        """Mean |engine − trainer| log-probability of the sampled tokens of one micro-batch. A row's trained-on
        tokens are its whole completion in order (logp is flat in row order); a masked row has none."""
        trained = [i for k, i in enumerate(rows) if bool(b.target[k].any())]
        engine = torch.tensor([lp for i in trained for lp in rollouts[i].logprobs], dtype=torch.float32)
        return float((engine - logp.float().cpu()).abs().mean()) if engine.numel() else 0.0

    def schedule_text(self) -> str:
        cfg = self.cfg
        return (f"{cfg.steps} steps of {cfg.batch_size} prompts x {cfg.num_generations} completions "
                f"({cfg.grad_accum} micro-batch{'es' if cfg.grad_accum > 1 else ''}), seq_len {cfg.seq_len}")

    def progress_fields(self, r: dict[str, Any]) -> dict[str, str]:
        fields = {"reward": f"{r['reward']:.3f}", "len": f"{r['completion_len']:.0f}"}
        if "accuracy" in r:
            fields["acc"] = f"{r['accuracy']:.2f}"
        return fields

    # ---- evaluation, outputs ------------------------------------------------------------------------
    def log_validation(self, full: bool = False) -> None:
        """Greedy held-out accuracy through the rollout engine (already on the current weights); the final
        figure comes from the written model directory instead (run's `accuracy`)."""
        if full or not self.eval_problems:
            return None
        from ..tasks.evaluate import score as score_answers

        outs = self.rollout.generate([prompt_ids(self.tokenizer, p) for p in self.eval_problems], 1,
                                     SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens),
                                     [0] * len(self.eval_problems))
        r = score_answers(self.task, self.eval_problems, [g[0].text for g in outs])
        self.metrics.write({"kind": "eval", "step": self.state["step"], "accuracy": r["accuracy"],
                            "well_formed": r["format"], "mean_reward": r["mean_reward"]})
        self.echo(f"step {self.state['step']:>6}  held-out exact match {r['accuracy']:.1%}, well-formed {r['format']:.1%}")
        return None

    def after_step(self, r: dict[str, Any]) -> None:
        st = self.state
        if r["no_signal"] and (st["no_signal_steps"] == 1 or st["no_signal_steps"] % NO_SIGNAL_WARN_EVERY == 0):
            self.echo(f"warning   step {st['step']}: every group's completions got the same reward, so every advantage "
                      f"is 0 and the step taught nothing ({st['no_signal_steps']} such steps so far). Raise the "
                      "temperature or num_generations, or start from a model that solves some problems.")

    def task_accuracy(self, model_dir):
        r = super().task_accuracy(model_dir)
        if r is not None and self.state["step"] >= self.cfg.steps:
            self.final_accuracy = r  # the written model's: the last point of the held-out curve
        return r

    def write_plots(self) -> list[Path]:
        from .grpo_plots import write_grpo_plots

        # held-out accuracy before training and of the final model: the same problems as every periodic evaluation
        points = [(0, self.state.get("accuracy_before")), (self.state["step"], self.final_accuracy)]
        return write_grpo_plots(self.run_dir, [(step, r["accuracy"]) for step, r in points if r is not None])

    def summary_extra(self) -> dict[str, Any]:
        """How the reward moved: means over the first and last tenth of the steps, and a verdict."""
        from ..train.plots import read_metrics

        train, _ = read_metrics(self.run_dir / "metrics.jsonl")
        rewards = [r["reward"] for r in train if "reward" in r]
        if not rewards:
            return {}
        k = max(1, len(rewards) // 10)
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        spread = float(np.std(rewards)) if len(rewards) > 1 else 0.0
        moved = abs(last - first) > max(1e-6, 0.5 * spread / math.sqrt(k))
        return {"reward_first": first, "reward_last": last, "reward_moved": moved,
                "no_signal_steps": self.state["no_signal_steps"]}


def grpo(cfg: GRPOConfig, resume: bool = False, model_hook: ModelHook | None = None, echo=print) -> dict[str, Any]:
    """`deepmoe grpo` (cfg resolved by posttrain.config.resolve)."""
    return run(GRPOTrainer(cfg, resume, model_hook), echo)


__all__ = ["GRPOTrainer", "grpo", "PromptSet", "read_prompts", "task_prompts", "rollout_batch", "rollout_seeds"]
