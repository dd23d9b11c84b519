"""Generated tasks with verifiable answers: the shared ground truth of SFT, distillation and GRPO.

A task makes problems (`problems(split, n, seed)`, split "train" or "test"), each with a question, a
reference answer and a worked R1-format solution, and scores any completion with `reward(prompt,
completion)`, a pure function. `get_task("arithmetic:max_digits=2,ops=+-")` builds one from a spec;
`accuracy` (deepmoe.tasks.evaluate) measures a model on held-out problems through the engine.
"""

from __future__ import annotations

import dataclasses
import typing

from .arithmetic import Arithmetic
from .base import CORRECT, MALFORMED, WELL_FORMED, Problem, parse_answer, r1_completion
from .countdown import Countdown

TASKS = {"arithmetic": Arithmetic, "countdown": Countdown}
Task = Arithmetic | Countdown


def get_task(spec: str) -> Task:
    """A task from `name` or `name:field=value,field=value` (fields of its dataclass, e.g.
    `arithmetic:max_digits=2,ops=+-`)."""
    name, _, options = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    cls = TASKS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(f"task {spec!r}: {item!r} is not field=value with a field of {name} "
                             f"({', '.join(sorted(fields))})")
        try:
            kwargs[key] = hints[key](value.strip())
        except ValueError:
            raise ValueError(f"task {spec!r}: {key} must be {hints[key].__name__}, got {value!r}") from None
    return cls(**kwargs)


__all__ = ["TASKS", "Task", "get_task", "Arithmetic", "Countdown", "Problem", "parse_answer", "r1_completion",
           "CORRECT", "WELL_FORMED", "MALFORMED"]
