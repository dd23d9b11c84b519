"""Reward functions for GRPO: the built-in tasks' rules and users' Python callables, checked and combined.

A reward function is called once per rollout batch as

    f(prompts: list[str], completions: list[str], **columns) -> list[float | None]

with one entry per completion (prompts repeat, once per completion of the same prompt). `columns` are
the prompt records' other fields, one list each, aligned with the completions (a task passes `question`
and `answer`). None means "does not apply to this completion". Several functions are combined by a
weighted sum over those that apply; a completion none of them applies to is an error, not a silent 0.

Functions are named on the command line as `module:function` (an importable module) or
`path/to/file.py:function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(ValueError):
    pass


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def load_reward(spec: str) -> RewardFn:
    """The callable named by `module:function` or `file.py:function`."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise RewardError(f"reward {spec!r}: expected module:function or path/to/file.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: no file {where!r}")
        name = f"deepmoe_reward_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # so the module's own imports and pickling find it
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"reward {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise RewardError(f"reward {spec!r}: cannot import module {where!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {where} has no callable {attr!r}")
    return fn


def task_reward(task) -> RewardFn:
    """A built-in task's rule reward in the reward-function signature (it reads the `question` column)."""
    def reward(prompts: list[str], completions: list[str], question: list[str], **_) -> list[float]:
        return [task.reward(q, c) for q, c in zip(question, completions, strict=True)]
    return reward


def call_reward(r: Reward, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[float | None]:
    """r's rewards for the batch, checked: one finite number or None per completion."""
    try:
        out = r.fn(prompts, completions, **columns)
    except Exception as e:
        raise RewardError(f"reward function {r.name!r} raised {type(e).__name__}: {e}") from e
    try:
        out = list(out)
    except TypeError:
        raise RewardError(f"reward function {r.name!r} returned {type(out).__name__}, not a list") from None
    if len(out) != len(completions):
        raise RewardError(f"reward function {r.name!r} returned {len(out)} values for {len(completions)} completions")
    for i, v in enumerate(out):
        if v is None:
            continue
        if isinstance(v, str) or not hasattr(v, "__float__"):  # numbers, bools, numpy and 0-d tensor scalars
            raise RewardError(f"reward function {r.name!r} returned {v!r} (a {type(v).__name__}) for completion {i}; "
                              "expected a number or None")
        if not math.isfinite(float(v)):
            raise RewardError(f"reward function {r.name!r} returned {float(v)} for completion {i}; rewards must be "
                              "finite (None means 'does not apply')")
    return [None if v is None else float(v) for v in out]


def combine(rewards: list[Reward], prompts: list[str], completions: list[str], columns: dict[str, list]
            ) -> tuple[list[float], dict[str, list[float | None]]]:
    """The weighted total per completion and each function's own values (by name)."""
    per_fn = {r.name: call_reward(r, prompts, completions, columns) for r in rewards}
    totals = []
    for i in range(len(completions)):
        applicable = [(r.weight, per_fn[r.name][i]) for r in rewards if per_fn[r.name][i] is not None]
        if not applicable:
            raise RewardError(f"no reward function applies to completion {i} (all returned None): "
                              f"{', '.join(r.name for r in rewards)}")
        totals.append(sum(w * v for w, v in applicable))
    return totals, per_fn
