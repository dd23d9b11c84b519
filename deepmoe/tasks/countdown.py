"""Countdown (as in TinyZero): reach a target with the given numbers, each used exactly once, and + − × ÷.

A problem is made by folding the numbers left to right with random operations that keep every
intermediate a positive integer (÷ only when exact), until the result lands in 1..max_target. The worked
solution is that fold, one `a op b = c` line per step, and the answer is the same expression written
with the fewest parentheses. Answers are checked exactly (fractions, so 7/2*2 is 7) from a parsed
expression tree, never with eval.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from fractions import Fraction

from .base import CORRECT, MALFORMED, WELL_FORMED, Problem, draw, parse_answer, r1_completion

_QUESTION = re.compile(r"Using the numbers ([\d, ]+), make (\d+)\.")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_MAX_ANSWER_CHARS = 200  # a longer "expression" is not an answer to a 3-6 number problem


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, the integer literals used, in order) of an expression of non-negative integers, + - * /
    and parentheses; None when it is anything else. A division by zero gives value None in the tuple's
    place: (None, numbers)."""
    if len(expression) > _MAX_ANSWER_CHARS:
        return None
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None
    numbers: list[int] = []

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            op = _OPS[type(node.op)]
            if op == "/":
                return None if right == 0 else left / right
            return left + right if op == "+" else left - right if op == "-" else left * right
        raise ValueError("not an arithmetic expression")

    try:
        value = walk(tree)
    except ValueError:
        return None
    return value, numbers


@dataclass(frozen=True)
class Countdown:
    min_numbers: int = 3
    max_numbers: int = 4
    max_value: int = 99
    max_target: int = 100
    held_out_fraction: float = 0.1
    split_seed: int = 0
    name = "countdown"

    def __post_init__(self) -> None:
        if not 2 <= self.min_numbers <= self.max_numbers <= 6:
            raise ValueError(f"countdown: need 2 <= min_numbers <= max_numbers <= 6, got {self.min_numbers}, "
                             f"{self.max_numbers}")
        if self.max_value < 2 or self.max_target < 1:
            raise ValueError("countdown: max_value must be >= 2 and max_target >= 1")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"countdown: held_out_fraction must be in (0, 1), got {self.held_out_fraction}")

    @staticmethod
    def question(numbers: list[int], target: int) -> str:
        return (f"Using the numbers {', '.join(map(str, numbers))}, make {target}. "
                "Use + - * / and each number exactly once.")

    def make(self, numbers: list[int], ops: list[str]) -> Problem:
        """The problem whose solution folds `numbers` left to right with `ops` (len(numbers) - 1 of them)."""
        acc, expr, prev_op = numbers[0], str(numbers[0]), None
        steps = []
        for x, op in zip(numbers[1:], ops):
            value = acc + x if op == "+" else acc - x if op == "-" else acc * x if op == "*" else Fraction(acc, x)
            if value != int(value):
                raise ValueError(f"countdown: {acc} / {x} is not an integer")
            value = int(value)
            steps.append(f"{acc} {op} {x} = {value}")
            # the folded expression is the left operand: it needs parentheses only under a tighter operator
            if prev_op is not None and _PRECEDENCE[prev_op] < _PRECEDENCE[op]:
                expr = f"({expr})"
            expr, acc, prev_op = f"{expr} {op} {x}", value, op
        shown = sorted(numbers)  # the question lists the numbers in order: it must not give the fold away
        return Problem(self.question(shown, acc), expr, r1_completion(steps, expr))

    def _generate(self, rng: random.Random) -> tuple[str, Problem]:
        while True:
            numbers = [rng.randint(1, self.max_value) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            acc, ops = numbers[0], []
            for x in numbers[1:]:
                choices = ["+"] + ["-"] * (acc > x) + ["*"] * (acc * x <= 10 * self.max_target) + \
                          ["/"] * (x > 1 and acc % x == 0)
                op = rng.choice(choices)
                ops.append(op)
                acc = acc + x if op == "+" else acc - x if op == "-" else acc * x if op == "*" else acc // x
            if 1 <= acc <= self.max_target:
                return f"{sorted(numbers)}={acc}", self.make(numbers, ops)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """n distinct problems of the "train" or "test" (held-out) split, fixed by (seed, split_seed)."""
        return draw(self._generate, split, n, seed, self.split_seed, self.held_out_fraction, self.name)

    @staticmethod
    def reward(prompt: str, completion: str) -> float:
        """1.0 when the answer uses exactly the given numbers and equals the target; 0.1 when it is a
        well-formed arithmetic expression that does not; 0.0 otherwise."""
        m = _QUESTION.search(prompt)
        if m is None:
            raise ValueError(f"not a countdown prompt (no 'Using the numbers …, make N.' in it): {prompt[:80]!r}")
        given = sorted(int(v) for v in m.group(1).replace(",", " ").split())
        target = int(m.group(2))
        answer = parse_answer(completion)
        parsed = None if answer is None else evaluate(answer)
        if parsed is None:
            return MALFORMED
        value, used = parsed
        return CORRECT if value == target and sorted(used) == given else WELL_FORMED
