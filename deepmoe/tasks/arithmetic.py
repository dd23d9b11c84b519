"""Multi-digit arithmetic with worked column-by-column reasoning.

Problems are `What is A op B?` with op in + − ×; A and B have min_digits..max_digits digits, except that ×
takes a one-digit multiplier (so the worked solution stays one line per digit). The solution spells the
operands out digit by digit, zero-padded to one width, then works the columns from the right with the
carry or borrow, the way it is taught by hand. Spelling the digits out matters for small models: BPE
tokenizers cut numbers into arbitrary chunks ("347" → "3", "47"), and single digits separated by spaces
are one token each, so every column reads the same way.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .base import CORRECT, MALFORMED, WELL_FORMED, Problem, draw, parse_answer, r1_completion

_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
_INTEGER = re.compile(r"-?\d+")


def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of n >= 0, most significant first, zero-padded to `width`."""
    return [int(c) for c in str(n).zfill(width)]


def _spell(digits: list[int]) -> str:
    return " ".join(map(str, digits))


def _add_steps(a: int, b: int) -> tuple[list[str], int]:
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    steps, out, carry = [f"{_spell(da)} + {_spell(db)}"], [], 0
    for x, y in zip(reversed(da), reversed(db)):
        s = x + y + carry
        steps.append(f"{x} + {y} + {carry} = {s}, write {s % 10} carry {s // 10}")
        out.append(s % 10)
        carry = s // 10
    if carry:
        out.append(carry)
    steps.append(f"result {_spell(out[::-1])}")
    return steps, a + b


def _sub_steps(a: int, b: int) -> tuple[list[str], int]:
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    steps = [f"{_spell(da)} - {_spell(db)}"]
    sign = ""
    if a < b:  # work the larger minus the smaller, then negate
        steps.append(f"{_spell(da)} < {_spell(db)}, so compute {_spell(db)} - {_spell(da)} and negate")
        da, db, sign = db, da, "-"
    out, borrow = [], 0
    for x, y in zip(reversed(da), reversed(db)):
        d = x - y - borrow
        new_borrow = int(d < 0)
        steps.append(f"{x} - {y} - {borrow} = {d}, write {d % 10} borrow {new_borrow}")
        out.append(d % 10)
        borrow = new_borrow
    steps.append(f"result {sign}{_spell(out[::-1])}")
    return steps, a - b


def _mul_steps(a: int, b: int) -> tuple[list[str], int]:
    da = _digits(a, len(str(a)))
    steps, out, carry = [f"{_spell(da)} * {b}"], [], 0
    for x in reversed(da):
        s = x * b + carry
        steps.append(f"{x} * {b} + {carry} = {s}, write {s % 10} carry {s // 10}")
        out.append(s % 10)
        carry = s // 10
    out.extend(_digits(carry, 1) if carry else [])  # carry < 9: a single digit
    steps.append(f"result {_spell(out[::-1])}")
    return steps, a * b


_STEPS = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}


@dataclass(frozen=True)
class Arithmetic:
    min_digits: int = 1
    max_digits: int = 3
    ops: str = "+-*"
    held_out_fraction: float = 0.1
    split_seed: int = 0
    name = "arithmetic"

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits <= 18:
            raise ValueError(f"arithmetic: need 1 <= min_digits <= max_digits <= 18, got {self.min_digits}, "
                             f"{self.max_digits}")
        if not self.ops or set(self.ops) - set(_STEPS):
            raise ValueError(f"arithmetic: ops must be a non-empty string of + - *, got {self.ops!r}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"arithmetic: held_out_fraction must be in (0, 1), got {self.held_out_fraction}")

    def make(self, a: int, op: str, b: int) -> Problem:
        """The problem `a op b` with its worked solution."""
        steps, value = _STEPS[op](a, b)
        return Problem(f"What is {a} {op} {b}?", str(value), r1_completion(steps, str(value)))

    def _operand(self, rng: random.Random) -> int:
        n = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1)

    def _generate(self, rng: random.Random) -> tuple[str, Problem]:
        op = rng.choice(self.ops)
        a = self._operand(rng)
        b = rng.randint(0, 9) if op == "*" else self._operand(rng)
        return f"{a}{op}{b}", self.make(a, op, b)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """n distinct problems of the "train" or "test" (held-out) split, fixed by (seed, split_seed)."""
        return draw(self._generate, split, n, seed, self.split_seed, self.held_out_fraction, self.name)

    @staticmethod
    def reward(prompt: str, completion: str) -> float:
        """1.0 correct, 0.1 well-formed with an integer answer that is wrong, 0.0 otherwise. `prompt` is any
        text containing the question (the bare question or the chat-rendered prompt)."""
        m = _QUESTION.search(prompt)
        if m is None:
            raise ValueError(f"not an arithmetic prompt (no 'What is A op B?' in it): {prompt[:80]!r}")
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        answer = parse_answer(completion)
        if answer is None or not _INTEGER.fullmatch(answer):
            return MALFORMED
        expected = a + b if op == "+" else a - b if op == "-" else a * b
        return CORRECT if int(answer) == expected else WELL_FORMED
