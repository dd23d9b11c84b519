"""What every generated task shares: the problem record, the R1 answer format, the reward levels, and a
train / held-out split that is fixed by a seed.

A completion is well-formed when it is exactly a reasoning block then an answer block (DeepSeek-R1's
format, with TinyZero's answer tag):
    <think>
    ...
    </think>
    <answer>...</answer>
The reward is a pure function of (prompt, completion): 1.0 for a correct answer, 0.1 for a well-formed
completion whose answer is wrong, 0.0 for anything else (TinyZero's levels), so a policy is paid a little
for learning the format before it can solve anything.

Split: a problem belongs to the held-out set when a hash of (split_seed, its canonical key) falls below the
held-out fraction. Membership depends on the problem alone, never on the order of generation, so no
training draw under any sampling seed can produce a held-out problem.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

CORRECT, WELL_FORMED, MALFORMED = 1.0, 0.1, 0.0
SPLITS = ("train", "test")

# the whole completion: optional leading whitespace, one think block, one answer block, nothing after
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    question: str  # the user message; the reward parses the problem back out of it
    answer: str  # the reference answer, as it appears inside <answer>…</answer>
    solution: str  # a complete well-formed completion: worked reasoning, then the answer

    def messages(self) -> list[dict[str, str]]:
        """The prompt as a chat: what the chat template renders and the model answers."""
        return [{"role": "user", "content": self.question}]


def r1_completion(steps: list[str], answer: str) -> str:
    """The R1-format completion for reasoning `steps` (one per line) and `answer`."""
    return "<think>\n" + "\n".join(steps) + "\n</think>\n<answer>" + answer + "</answer>"


def parse_answer(completion: str) -> str | None:
    """The text inside <answer>…</answer> of a well-formed completion (stripped), else None."""
    m = _FORMAT.fullmatch(completion)
    if m is None or "<think>" in m.group(1) or "<answer>" in m.group(2):
        return None
    return m.group(2).strip()


def held_out(key: str, split_seed: int, fraction: float) -> bool:
    """Whether the problem with canonical `key` is in the held-out set (the same on every machine)."""
    digest = hashlib.sha256(f"{split_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def draw(generate: Callable[[random.Random], tuple[str, Problem]], split: str, n: int, seed: int,
         split_seed: int, fraction: float, what: str) -> list[Problem]:
    """The first n distinct problems of `split` from the stream of `generate(rng)` (which returns a
    canonical key and the problem) seeded by (seed, split). Stops with an error when the problem space
    cannot supply n distinct problems of that split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    want_held_out = split == "test"
    rng = random.Random(f"{seed}:{split}")  # str seeds are hashed deterministically (not by PYTHONHASHSEED)
    seen: set[str] = set()
    out: list[Problem] = []
    budget = 50 * n + 10_000  # draws before concluding the space is too small
    while len(out) < n and budget > 0:
        budget -= 1
        key, problem = generate(rng)
        if key in seen or held_out(key, split_seed, fraction) != want_held_out:
            continue
        seen.add(key)
        out.append(problem)
    if len(out) < n:
        raise ValueError(f"{what}: found only {len(out)} distinct {split} problems, {n} asked for; the problem "
                         "space is too small (allow more digits or numbers, or ask for fewer)")
    return out
