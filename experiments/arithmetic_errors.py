"""Where a model fine-tuned on the arithmetic task goes wrong: reading the operands into digits, the
column sums, or writing its own result digits back as the answer (docs/experiments.md, section c).

    python experiments/arithmetic_errors.py runs/sft-arith/final [--task arithmetic:max_digits=2,ops=+-]
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from deepmoe.engine.llm import LLM
from deepmoe.engine.sequence import SamplingParams
from deepmoe.tasks import CORRECT, get_task
from deepmoe.tasks.evaluate import prompt_ids

_COLUMN = re.compile(r"(\d) ([-+]) (\d) [-+] (\d) = (-?\d+), write (\d) (?:carry|borrow) (\d)")


def column_right(line: str) -> bool | None:
    """Whether a worked column line is arithmetically right (None when it is not a column line)."""
    m = _COLUMN.fullmatch(line)
    if m is None:
        return None
    a, op, b, c, total, digit, out = int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5]), int(m[6]), int(m[7])
    s = a + b + c if op == "+" else a - b - c
    return total == s and digit == s % 10 and out == (s // 10 if op == "+" else int(s < 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--task", default="arithmetic:max_digits=2,ops=+-")
    p.add_argument("--problems", type=int, default=200)
    args = p.parse_args()
    task = get_task(args.task)
    problems = task.problems("test", args.problems, 0)
    llm = LLM(args.model, device="cpu", dtype=torch.float32)
    outs = llm.generate([prompt_ids(llm.tokenizer, q) for q in problems],
                        SamplingParams(temperature=0, max_tokens=80, seed=0))
    n = dict(problems=len(problems), correct=0, operands_read=0, columns=0, columns_right=0, results=0,
             answer_is_result=0)
    for q, o in zip(problems, outs):
        n["correct"] += task.reward(q.question, o.text) == CORRECT
        lines = o.text.split("\n")
        if len(lines) > 1 and lines[1] == q.solution.split("\n")[1]:  # the spelled-out operands
            n["operands_read"] += 1
            checks = [r for r in map(column_right, lines[2:]) if r is not None]
            n["columns"] += len(checks)
            n["columns_right"] += sum(checks)
        result = next((line[len("result "):] for line in lines if line.startswith("result ")), None)
        answer = re.search(r"<answer>(.*?)</answer>", o.text)
        if result is not None and answer and re.fullmatch(r"-?[\d ]+", result):
            n["results"] += 1
            n["answer_is_result"] += str(int(result.replace(" ", ""))) == answer[1].strip()
    print(json.dumps(n))


if __name__ == "__main__":
    main()
