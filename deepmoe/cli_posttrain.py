"""The post-training subcommands of `deepmoe`: sft, distill and grpo (deepmoe.posttrain).

Their flags are generated from the config dataclasses (SFTConfig, DistillConfig, GRPOConfig): one flag per
field that has a help text here, typed and with its default shown; `--resume` continues a run from its saved
config. Conventions as in cli_args.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_args import add_dataclass_flags, add_model_arg, at_least, device, existing_path, model_dir

# ---- flags from the config dataclasses ----------------------------------------------------------------
# help per SFTConfig / DistillConfig field; flags are --field-name, types from the dataclass. As for train,
# a field whose default is None says in its help what it becomes; the others get their default appended.
SFT_HELP = {
    "data": "chat JSONL ({'messages': [{'role', 'content'}, ...]}) or prompt/completion JSONL (default: none; "
            "give --data or --task)",
    "task": "or a built-in task: arithmetic, countdown, with options as name:field=value,... "
            "(e.g. arithmetic:max_digits=2,ops=+-; default: none)",
    "task_examples": "--task: training problems to generate",
    "val_fraction": "--data: share of records held out for the validation loss (by content hash)",
    "val_examples": "--task: held-out problems whose worked solutions give the validation loss",
    "eval_problems": "--task: held-out problems answered greedily through the engine for accuracy, before "
                     "and after; 0 turns it off",
    "max_new_tokens": "generation budget per answer in the accuracy evaluation",
    "on_bad_line": "a malformed JSONL line: stop (naming file:line) or skip (each listed in the log)",
    "out": "run directory (required)",
    "seq_len": "longest example in tokens; longer ones are truncated and counted "
               "(default: min(1024, the model's context))",
    "batch_size": "examples per micro-batch (padded to the longest)", "grad_accum": "micro-batches per step",
    "steps": "optimizer steps (default: one epoch of the training set)",
    "lr": "peak learning rate (default: 1e-3 for hidden_size <= 512, else 2e-5; 10x that with --lora-rank)",
    "min_lr_ratio": "cosine floor as a fraction of --lr", "warmup_steps": "linear warmup (default: 5%% of the steps)",
    "schedule": "cosine, multistep or constant", "decay_at": "multistep: comma-separated fractions of the run",
    "decay_factor": "multistep: factor at each drop", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "eps": "AdamW epsilon", "weight_decay": "AdamW weight decay", "grad_clip": "gradient-norm clip (0: off)",
    "mtp_weight": "lambda of the MTP loss on the trained-on tokens (0: MTP layers left as they are)",
    "bias_update_rate": "gamma of aux-loss-free balancing (0: off; default: 0.001, and 0 with --lora-rank, which "
                        "keeps the base and its balancing bias unchanged)",
    "aux_loss_alpha": "sequence-wise balance loss weight (default: the model config's)",
    "capacity_factor": "cap experts at this multiple of the mean load (default: dropless)",
    "lora_rank": "train a LoRA adapter of this rank on the frozen model instead of the model; writes RUN/adapter, "
                 "and RUN/final as the model with it merged (default: none, full fine-tuning)",
    "lora_alpha": "LoRA: the update is scaled by alpha / rank (default: 2 x rank)",
    "lora_targets": "LoRA: comma-separated layers to adapt, as peft names them: all-linear (attention, dense and "
                    "shared-expert MLPs), experts (routed experts), gate (routers), embed_tokens, lm_head, "
                    "q_a_proj, o_proj, ...",
    "lora_dropout": "LoRA: dropout on the input of the linear layers' adapters",
    "device": "cpu, cuda or cuda:N (default: cuda if available)",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16",
    "qat": "quantisation-aware training: fake-quantise the weights `deepmoe quantize --scheme` int8/int4 would "
           "quantise, in the forward pass (straight-through gradient); not with --lora-rank (default: off)",
    "qat_group_size": "--qat: input channels per scale, as `deepmoe quantize --group-size`",
    "activation_checkpointing": "recompute each block in backward", "compile": "torch.compile each block",
    "seed": "seed of problem generation and data order", "max_bad_steps": "non-finite steps in a row before stopping",
    "eval_every": "steps between validations (default: a tenth of the steps)",
    "eval_batches": "batches per periodic validation",
    "checkpoint_every": "steps between checkpoints (default: a quarter of the steps)",
    "keep_checkpoints": "checkpoints kept", "plots": "write PNG plots", "progress": "show the progress bar",
}
DISTILL_HELP = {
    **{k: v for k, v in SFT_HELP.items() if not k.startswith("lora_")},  # LoRA is sft's: a student trains whole
    "bias_update_rate": "gamma of aux-loss-free balancing (0: off; default: 0.001)",
    "lr": "peak learning rate (default: 1e-3 for hidden_size <= 512, else 2e-5)",
    "model": "the student model directory (default: none, for a fresh student built from a preset or config)",
    "teacher": "the teacher model directory (required)",
    "student_preset": "or a fresh student from a preset, with the teacher's tokenizer (default: none)",
    "student_config": "or a fresh student from a config.json, with the teacher's tokenizer (default: none)",
    "mode": "logit (match the teacher's distributions on the data) or sequence (SFT on the teacher's "
            "answers to --task prompts)",
    "kl": "logit: forward KL(teacher||student), reverse, or mix", "kl_mix": "mix: weight of the forward KL",
    "temperature": "logit: softmax temperature T (the KL is scaled by T^2)",
    "kd_weight": "logit: w in (1 - w) CE + w KL (0: SFT on the data alone, the teacher is not run)",
    "kd_chunk": "logit: positions per KL chunk (bounds logits in memory)",
    "teacher_temperature": "sequence: the teacher's sampling temperature (0: greedy)",
    "keep_incorrect": "sequence: also train on answers the task marks wrong",
}
GRPO_HELP = {
    **SFT_HELP,
    "data": "or a JSONL of prompts ({'prompt': text} or {'messages': [...]}, other fields go to the reward "
            "functions; needs --rewards) (default: none)",
    "task": "a built-in task whose problems are the prompts and whose rule is a reward: arithmetic, countdown, "
            "with options as name:field=value,... (default: none; give --task or --data)",
    "task_examples": "--task: training prompts to generate",
    "eval_problems": "--task: held-out problems answered greedily for accuracy: before, every --eval-every "
                     "steps, and after; 0 turns it off",
    "max_new_tokens": "tokens per rollout (and per evaluation answer)",
    "seq_len": "longest prompt + completion; longer prompts are skipped and counted "
               "(default: min(1024, the model's context))",
    "batch_size": "prompts per step (each gets --num-generations completions)",
    "grad_accum": "micro-batches a step's completions are split into (memory)",
    "steps": "rollout batches (each one or --num-iterations optimizer steps)",
    "lr": "learning rate (default: 2e-5 for hidden_size <= 512, else 1e-6)",
    "warmup_steps": "linear warmup (default: 5%% of the steps)",
    "bias_update_rate": "gamma of aux-loss-free balancing from the rollouts' expert loads (0: the bias stays)",
    "seed": "seed of prompt order and rollout sampling",
    "eval_every": "steps between held-out evaluations (default: a tenth of the steps)",
    "num_generations": "G: completions per prompt, compared within their group",
    "num_iterations": "mu: optimizer steps per rollout batch",
    "temperature": "rollout sampling temperature (log-probabilities are taken at it too)",
    "epsilon": "clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon]",
    "epsilon_high": "upper clip range, DAPO's clip-higher, e.g. 0.28 (default: --epsilon)",
    "beta": "KL coefficient to the starting model (k3 estimator; 0 loads no reference model)",
    "loss_type": "grpo (per-sequence mean), dapo (token mean over the batch), dr_grpo (constant length)",
    "scale_rewards": "divide advantages by the group's reward std, the batch's, or none (Dr. GRPO)",
    "mask_truncated": "no loss on completions cut at --max-new-tokens",
    "rewards": "reward functions, comma-separated module:function or file.py:function, called as "
               "f(prompts, completions, **columns) -> list of float or None (default: none)",
    "reward_weights": "comma-separated weights, the task's reward first (default: all 1)",
    "logprob_chunk": "positions whose fp32 logits exist at once",
}
for _key in ("val_fraction", "val_examples", "eval_batches", "mtp_weight", "lora_rank", "lora_alpha", "lora_targets",
             "lora_dropout", "qat", "qat_group_size"):  # not used by GRPO (adapters: merge first; see docs/grpo.md)
    GRPO_HELP.pop(_key)
# may differ from the saved config on --resume: logging, evaluation, checkpointing, where things live, length
POSTTRAIN_RESUME_OVERRIDES = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "plots", "progress",
                              "device", "eval_batches", "max_bad_steps", "eval_problems", "max_new_tokens"}


def _add_posttrain_flags(p: argparse.ArgumentParser, cls, helps: dict[str, str], renames: dict[str, str]) -> None:
    from .config import list_presets
    from .posttrain.config import DISTILL_MODES, PRECISIONS
    from .posttrain.data import BAD_LINE_POLICIES
    from .posttrain.losses import KL_KINDS
    from .train.config import QAT_SCHEMES, SCHEDULES

    from .posttrain.grpo_loss import LOSS_TYPES, SCALE_REWARDS

    choices = {"on_bad_line": BAD_LINE_POLICIES, "schedule": SCHEDULES, "precision": PRECISIONS,
               "mode": DISTILL_MODES, "kl": KL_KINDS, "student_preset": list_presets(), "loss_type": LOSS_TYPES,
               "scale_rewards": SCALE_REWARDS, "qat": QAT_SCHEMES}
    types = {"device": device, "teacher": model_dir, "model": model_dir, "data": existing_path,
             "student_config": existing_path, "lora_rank": at_least(1)}
    add_dataclass_flags(p, cls, helps, choices, types, renames)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint; flags that would change its data, "
                        "model or objective are refused")


def _posttrain_config(args, cls, helps: dict[str, str]):
    """The resolved config: from the flags, or on --resume the run's saved one (flags that would change
    the computation are refused)."""
    import dataclasses

    import torch

    from .posttrain.config import resolve

    given = {k: v for k, v in vars(args).items() if k in helps or k == "model"}
    if given.get("model") is None:
        given.pop("model", None)
    if not args.resume:
        return resolve(cls(**given), torch.cuda.is_available())
    if "out" not in given:
        raise ValueError("--resume needs --out RUN: the run to continue")
    saved_path = Path(given["out"]) / cls.FILE
    if not saved_path.is_file():
        raise FileNotFoundError(f"nothing to resume: {str(saved_path)!r} does not exist")
    saved = cls.from_json(saved_path)
    changed = sorted(k for k, v in given.items()
                     if k not in POSTTRAIN_RESUME_OVERRIDES | {"out"} and getattr(saved, k) != v)
    if changed:
        raise ValueError(f"--resume continues the saved run; these flags would change it: "
                         f"{', '.join('--' + k.replace('_', '-') for k in changed)} (remove them)")
    keep = {k: v for k, v in given.items() if k in POSTTRAIN_RESUME_OVERRIDES}
    return resolve(dataclasses.replace(saved, **keep), torch.cuda.is_available())


def _print_posttrain_summary(summary: dict, out: str) -> None:
    from .posttrain.footprint import format_footprint
    from .posttrain.sft import format_accuracy

    print(f"done      {summary['steps']} steps, {summary['tokens']:,} tokens ({summary['target_tokens']:,} trained on) "
          f"in {summary['train_time_s']:.0f}s ({summary['tokens_per_s']:,} tok/s), {summary['skipped_steps']} skipped")
    if summary["val_loss"] is not None:
        print(f"val       loss {summary['val_loss']:.4f}  ppl {summary['val_ppl']:.2f}  (trained-on tokens)")
    for label, key in (("before", "accuracy_before"), ("after", "accuracy")):
        if summary.get(key):
            print(format_accuracy(label, summary[key]))
    if "trainable_parameters" in summary:  # not in the summary of a run finished before it was reported
        print(format_footprint(summary))
    print(f"model     {summary['final']}")
    if summary.get("adapter"):
        print(f"adapter   {summary['adapter']} (LoRA, peft layout; final is the base with it merged)")
    if summary["plots"]:
        print(f"plots     {', '.join(str(Path(out) / p) for p in summary['plots'])}")
    if summary.get("accuracy") and summary["accuracy"]["examples"]:
        ex = summary["accuracy"]["examples"][0]
        print(f"sample    {ex['question']}\n{ex['completion']}")


def add_sft_parser(sub) -> None:
    from .posttrain.config import SFTConfig

    p = sub.add_parser("sft", help="supervised fine-tuning on chat / prompt-completion JSONL or a built-in task",
                       description="Fine-tune a model directory, whole or with a LoRA adapter (--lora-rank); the loss "
                                   "covers assistant tokens only. Writes RUN/final (a model directory), "
                                   "RUN/adapter under LoRA, metrics.jsonl, checkpoints, plots.")
    add_model_arg(p, required=False)  # not needed with --resume: the run's config names it
    _add_posttrain_flags(p, SFTConfig, SFT_HELP, {})
    p.set_defaults(func=cmd_sft)


def cmd_sft(args) -> int:
    from .posttrain.config import SFTConfig
    from .posttrain.sft import sft

    cfg = _posttrain_config(args, SFTConfig, SFT_HELP)
    _print_posttrain_summary(sft(cfg, resume=args.resume), cfg.out)
    return 0


def add_distill_parser(sub) -> None:
    from .posttrain.config import DistillConfig

    p = sub.add_parser("distill", help="distil a teacher model into a student (logit KD or sequence-level)",
                       description="Logit KD on --data/--task text, or SFT of the student on the teacher's "
                                   "answers to --task prompts (--mode sequence).")
    _add_posttrain_flags(p, DistillConfig, DISTILL_HELP, {"model": "--student"})
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    from .posttrain.config import DistillConfig
    from .posttrain.distill import distill

    cfg = _posttrain_config(args, DistillConfig, DISTILL_HELP)
    _print_posttrain_summary(distill(cfg, resume=args.resume), cfg.out)
    return 0


def add_grpo_parser(sub) -> None:
    from .posttrain.config import GRPOConfig

    p = sub.add_parser("grpo", help="reinforcement learning with rule rewards (GRPO), rollouts from the engine",
                       description="Group-relative policy optimisation on a built-in task or a prompt JSONL scored "
                                   "by reward functions. Writes RUN/final, metrics.jsonl, checkpoints, reward.png "
                                   "and length.png.")
    add_model_arg(p, required=False)
    _add_posttrain_flags(p, GRPOConfig, GRPO_HELP, {})
    p.set_defaults(func=cmd_grpo)


def cmd_grpo(args) -> int:
    from .posttrain.config import GRPOConfig
    from .posttrain.grpo import grpo

    cfg = _posttrain_config(args, GRPOConfig, GRPO_HELP)
    summary = grpo(cfg, resume=args.resume)
    _print_posttrain_summary(summary, cfg.out)
    if "reward_first" in summary:
        verdict = ("" if summary["reward_moved"] else
                   "  -- the rollout reward did not move; if held-out accuracy did not either, check the reward "
                   "functions, the temperature and the lr")
        print(f"reward    {summary['reward_first']:.3f} over the first tenth of the steps -> "
              f"{summary['reward_last']:.3f} over the last tenth{verdict}")
        if summary["no_signal_steps"]:
            print(f"note      {summary['no_signal_steps']} of {summary['steps']} steps had no reward spread in any "
                  "group (nothing to learn from)")
    return 0
