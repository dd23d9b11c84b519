"""Held-out accuracy of a model on a task, through the inference engine.

Each problem's chat prompt is rendered with the model's chat template (as a client of `deepmoe serve`
would see it), answered greedily by the engine in one batch, and scored by the task's reward. Exact match
= the share of completions with reward 1.0; `format` = the share that are well-formed at all.
"""

from __future__ import annotations

from typing import Any

from ..engine.sequence import SamplingParams
from .base import CORRECT, MALFORMED, Problem


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    """The token ids the model sees before answering `problem` (chat template, generation prompt on)."""
    return tokenizer.encode(tokenizer.apply_chat_template(problem.messages(), add_generation_prompt=True))


def score(task, problems: list[Problem], completions: list[str]) -> dict[str, Any]:
    """Accuracy figures from completions already generated (pure: no model involved)."""
    rewards = [task.reward(p.question, c) for p, c in zip(problems, completions, strict=True)]
    n = len(rewards)
    return {"n": n, "accuracy": sum(r == CORRECT for r in rewards) / n,
            "format": sum(r > MALFORMED for r in rewards) / n, "mean_reward": sum(rewards) / n}


def accuracy(llm, task, problems: list[Problem], max_tokens: int = 256, examples: int = 3,
             tokenizer=None) -> dict[str, Any]:
    """Greedy exact-match accuracy of `llm` (a deepmoe.LLM, or anything with .tokenizer and
    .generate(list of token-id lists, SamplingParams)) on `problems`, prompts rendered with `tokenizer`
    (default: the llm's); the first `examples` completions are returned too, so a report can show what
    the model wrote."""
    if not problems:
        raise ValueError("accuracy needs at least one problem")
    tokenizer = tokenizer or llm.tokenizer
    # a fixed seed: greedy draws nothing, and the engine then leaves the global RNG (a training run's) alone
    outs = llm.generate([prompt_ids(tokenizer, p) for p in problems],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0))
    completions = [o.text for o in outs]
    result = score(task, problems, completions)
    result["truncated"] = sum(o.finish_reason == "length" for o in outs) / len(outs)
    result["examples"] = [{"question": p.question, "completion": c} for p, c in
                          list(zip(problems, completions))[:examples]]
    return result
