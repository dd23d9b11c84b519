"""Run health: did a step's loss or gradient norm blow up against the run's running baseline, and which
checkpoint comes from before the blow-up.

A step is healthy when its loss and gradient norm are finite, its loss is at most LOSS_SPIKE times its
running mean and its gradient norm within a factor GRAD_JUMP of its own, either way: weights blown up by
too large a step saturate the softmaxes, and their gradient then often collapses to zero rather than
exploding, while the loss, early in training, still looks ordinary. The means are exponential and move on
healthy steps only, so a blow-up cannot drag its own baseline along and then pass for normal. The first
unhealthy step of an unbroken run of them is the blow-up; a healthy step ends it.

Step s measures the weights after s − 1 updates (its loss and gradients come before its own update), so
the weights of checkpoint N are vouched for by step N + 1. A run that blew up at step b therefore has its
last trustworthy weights in checkpoint b − 2 or earlier: the checkpoint at b − 1 holds the update that
broke it.

The state is a plain dict kept in the trainer's state (and so in every checkpoint's state.json), which is
how a resumed run knows its baseline and whether it was blowing up when it was saved.
"""

from __future__ import annotations

import math
from typing import Any

LOSS_SPIKE = 1.5  # a loss 50% above its running mean is no longer noise: early training only falls
GRAD_JUMP = 10.0  # gradient norms swing several-fold in a healthy run; ten-fold, up or down, is a blow-up
MEAN_WEIGHT = 0.1  # weight of each new healthy step in the running means (~10-step memory)


def new_health() -> dict[str, Any]:
    return {"loss_mean": None, "grad_norm_mean": None, "blowup": None}


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _mean(old: float | None, new: float) -> float:
    return new if old is None else old + MEAN_WEIGHT * (new - old)


def observe(health: dict[str, Any], step: int, loss: float, grad_norm: float) -> dict[str, Any]:
    """The health after `step` (1-based) reported `loss` and `grad_norm`; `health` itself is not changed."""
    loss_mean, gn_mean = health["loss_mean"], health["grad_norm_mean"]
    healthy = (_finite(loss) and _finite(grad_norm)
               and (not loss_mean or loss <= LOSS_SPIKE * loss_mean)  # no baseline yet (or a zero one): no spike
               and (not gn_mean or gn_mean / GRAD_JUMP <= grad_norm <= GRAD_JUMP * gn_mean))
    if healthy:
        return {"loss_mean": _mean(loss_mean, loss), "grad_norm_mean": _mean(gn_mean, grad_norm), "blowup": None}
    blowup = health["blowup"] or {  # the first unhealthy step of this run of them, with what it was measured against
        "step": step, "loss": loss if _finite(loss) else None, "grad_norm": grad_norm if _finite(grad_norm) else None,
        "loss_mean": loss_mean, "grad_norm_mean": gn_mean}
    return {"loss_mean": loss_mean, "grad_norm_mean": gn_mean, "blowup": blowup}


def last_sound_step(health: dict[str, Any]) -> int | None:
    """The newest step whose checkpoint has weights from before the current blow-up (None: not blowing up)."""
    return None if health["blowup"] is None else health["blowup"]["step"] - 2


def describe_blowup(health: dict[str, Any]) -> str:
    """One phrase on what blew up: 'at step 6 (gradient norm non-finite; its running mean was 3.1)'."""
    b = health["blowup"]
    parts = []
    for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
        mean = b[f"{key}_mean"]
        value = "non-finite" if b[key] is None else f"{b[key]:.4g}"
        parts.append(f"{name} {value}" + ("" if mean is None else f" against a running mean of {mean:.4g}"))
    return f"at step {b['step']} ({', '.join(parts)})"
