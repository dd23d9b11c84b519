"""GRPO plots: a run's metrics.jsonl drawn as two PNGs beside it.

    reward.png   is it learning?  rollout reward (raw and smoothed), rollout accuracy, held-out greedy
                 accuracy at each evaluation, and the share of groups without any reward spread (no signal);
    length.png   what is it writing?  completion length (mean and longest) and the truncated share, next to
                 the policy's entropy, KL to the reference and how often the clip acted.
Like the training plots, nothing is drawn (and nothing fails) without matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..train.plots import _ema, _save, _series


def read_records(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a GRPO metrics.jsonl; a torn last line is ignored."""
    train, evals = [], []
    lines = [s for s in path.read_text(errors="replace").splitlines() if s.strip()]
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:
                break
            raise
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind == "train":
            train.append(rec)
        elif kind == "eval":
            evals.append(rec)
    return train, evals


def write_grpo_plots(run_dir, held_out: list[tuple[int, float]] = ()) -> list[Path]:
    """held_out: (step, accuracy) points measured outside the run's eval records (before training, of the
    final model), drawn on the held-out curve with them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    run_dir = Path(run_dir)
    train, evals = read_records(run_dir / "metrics.jsonl")
    if not train:
        return []
    evals = sorted(evals + [{"step": step, "accuracy": acc} for step, acc in held_out], key=lambda r: r["step"])
    return [_save(_reward_figure(train, evals), run_dir / "reward.png"),
            _save(_length_figure(train), run_dir / "length.png")]


def _reward_figure(train: list[dict], evals: list[dict]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, ax_sig = fig.subplots(1, 2)
    steps, reward = _series(train, "reward")
    ax.plot(steps, reward, color="C0", lw=0.6, alpha=0.3, label="rollout reward")
    ax.plot(steps, _ema(reward, 0.1), color="C0", lw=1.6, label="rollout reward (EMA)")
    steps, acc = _series(train, "accuracy")
    if acc:
        ax.plot(steps, _ema(acc, 0.1), color="C2", lw=1.2, ls="--", label="rollout exact match (EMA)")
    esteps, eacc = _series(evals, "accuracy")
    if eacc:
        ax.plot(esteps, eacc, color="C3", marker="o", ms=4, lw=1.2, label="held-out exact match (greedy)")
    ax.set(xlabel="step", ylabel="reward / accuracy", title="reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", framealpha=0.9)

    steps, zero = _series(train, "frac_reward_zero_std")
    ax_sig.plot(steps, zero, color="C4", lw=0.6, alpha=0.3)
    ax_sig.plot(steps, _ema(zero, 0.1), color="C4", lw=1.4, label="groups with equal rewards (no signal)")
    steps, std = _series(train, "reward_std")
    ax_sig.plot(steps, _ema(std, 0.1), color="C1", lw=1.2, label="reward std (EMA)")
    ax_sig.set(xlabel="step", ylim=(0, None), title="learning signal")
    ax_sig.grid(alpha=0.3)
    ax_sig.legend(loc="best", fontsize="small", framealpha=0.9)
    return fig


def _length_figure(train: list[dict]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, ax_pol = fig.subplots(1, 2)
    steps, length = _series(train, "completion_len")
    ax.plot(steps, length, color="C0", lw=1.2, label="mean completion length")
    steps, longest = _series(train, "completion_len_max")
    ax.plot(steps, longest, color="C0", lw=0.6, alpha=0.4, label="longest")
    ax.set(xlabel="step", ylabel="tokens", title="completion length")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    steps, trunc = _series(train, "truncated")
    if any(trunc):
        ax_t = ax.twinx()
        handles += ax_t.plot(steps, trunc, color="C3", lw=0.8, label="truncated share")
        ax_t.set(ylabel="truncated share", ylim=(0, 1))
    ax.legend(handles=handles, loc="best", fontsize="small", framealpha=0.9)

    for key, color, label in (("entropy", "C2", "entropy (nats/token)"), ("kl", "C1", "KL to reference (k3)"),
                              ("clip_fraction", "C4", "clipped share of tokens")):
        steps, values = _series(train, key)
        if values:
            ax_pol.plot(steps, _ema(values, 0.1), color=color, lw=1.2, label=label)
    ax_pol.set(xlabel="step", title="policy")
    ax_pol.grid(alpha=0.3)
    ax_pol.legend(loc="best", fontsize="small", framealpha=0.9)
    return fig
