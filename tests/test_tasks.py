"""Generated tasks: worked solutions that are right, rewards at their three levels, a split that never
leaks, task specs, and accuracy scoring through an engine-shaped object."""

import dataclasses
import random

import pytest

from deepmoe.engine.llm import CompletionOutput, RequestOutput
from deepmoe.tasks import Arithmetic, Countdown, get_task, parse_answer
from deepmoe.tasks.base import held_out
from deepmoe.tasks.countdown import evaluate
from deepmoe.tasks.evaluate import accuracy, score


def test_addition_solution_works_the_columns():
    p = Arithmetic().make(347, "+", 589)
    assert p.question == "What is 347 + 589?"
    assert p.answer == "936"
    assert p.solution == ("<think>\n3 4 7 + 5 8 9\n"
                          "7 + 9 + 0 = 16, write 6 carry 1\n"
                          "4 + 8 + 1 = 13, write 3 carry 1\n"
                          "3 + 5 + 1 = 9, write 9 carry 0\n"
                          "result 9 3 6\n</think>\n<answer>936</answer>")


def test_subtraction_and_multiplication_solutions():
    sub = Arithmetic().make(37, "-", 800)
    assert sub.answer == "-763"
    assert "0 3 7 < 8 0 0, so compute 8 0 0 - 0 3 7 and negate" in sub.solution
    assert "0 - 7 - 0 = -7, write 3 borrow 1" in sub.solution and "result -7 6 3" in sub.solution
    mul = Arithmetic().make(347, "*", 6)
    assert mul.answer == "2082"
    assert "7 * 6 + 0 = 42, write 2 carry 4\n4 * 6 + 4 = 28, write 8 carry 2\n3 * 6 + 2 = 20, write 0 carry 2\n" \
           "result 2 0 8 2" in mul.solution


@pytest.mark.parametrize("task", [Arithmetic(max_digits=4), Countdown()])
def test_every_worked_solution_earns_full_reward(task):
    for p in task.problems("train", 300, seed=3) + task.problems("test", 100, seed=3):
        assert task.reward(p.question, p.solution) == 1.0, p
        assert parse_answer(p.solution) == p.answer


def test_arithmetic_answers_are_the_true_values():
    rng = random.Random(0)
    t = Arithmetic(max_digits=5)
    for _ in range(500):
        a, b, op = rng.randint(0, 99999), rng.randint(0, 99999), rng.choice("+-*")
        b = b % 10 if op == "*" else b
        assert int(t.make(a, op, b).answer) == eval(f"{a} {op} {b}")


def test_reward_levels():
    r = Arithmetic.reward
    q = "What is 12 + 30?"
    assert r(q, "<think>\n2 + 0 = 2\n</think>\n<answer>42</answer>") == 1.0
    assert r(q, "  <think>x</think><answer> 42 </answer>\n") == 1.0  # whitespace around the blocks is fine
    assert r(q, "<think>x</think>\n<answer>41</answer>") == 0.1  # well-formed, wrong
    assert r(q, "<answer>42</answer>") == 0.0  # no reasoning block
    assert r(q, "<think>x</think>\n<answer>forty-two</answer>") == 0.0  # not an integer
    assert r(q, "<think>x</think>\n<answer>42</answer> and more") == 0.0  # text after the answer
    assert r(q, "<think>x</think>\n<answer>42") == 0.0  # truncated
    assert r(q, "42") == 0.0
    # the prompt may be the chat-rendered one: the question is found inside it
    assert r("<|bos|><|user|>\nWhat is 12 + 30?<|eos|>\n<|assistant|>\n", "<think></think><answer>42</answer>") == 1.0
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        r("Using the numbers 1, 2, make 3.", "<think></think><answer>3</answer>")


def test_countdown_reward_and_exact_evaluation():
    q = Countdown.question([3, 7, 25, 50], 72)
    r = Countdown.reward
    assert r(q, "<think>t</think><answer>(50 - 25 + 7) * 3 - 24</answer>") == 0.1  # 24 is not given
    assert r(q, "<think>t</think><answer>50 + 25 - 3 + 7</answer>") == 0.1  # every number once, but 79
    assert r(q, "<think>t</think><answer>50 + 25 - 3</answer>") == 0.1  # 72, but 7 unused
    assert r(q, "<think>t</think><answer>(50 + 25 - 3) * 7 / 7</answer>") == 0.1  # 72, but 7 used twice
    q2 = Countdown.question([2, 3, 7], 7)
    assert r(q2, "<think>t</think><answer>7 / 2 * 2 * 3 / 3</answer>") == 0.1  # uses 2 and 3 twice
    q3 = Countdown.question([2, 7, 14], 49)
    assert r(q3, "<think>t</think><answer>7 / 2 * 14</answer>") == 1.0  # exact: 3.5 * 14 = 49
    assert r(q3, "<think>t</think><answer>7 * (14 / 2)</answer>") == 1.0
    assert r(q3, "<think>t</think><answer>7 / (14 - 14) + 2</answer>") == 0.1  # division by zero: wrong
    assert r(q3, "<think>t</think><answer>__import__('os')</answer>") == 0.0  # never evaluated
    assert r(q3, "<think>t</think><answer>7 ** 2</answer>") == 0.0  # only + - * /
    assert evaluate("7 / 2 * 14") == (49, [7, 2, 14])
    assert evaluate("1 +") is None


def test_countdown_problem_and_solution():
    p = Countdown().make([50, 25, 7, 3], ["-", "+", "*"])
    assert p.question == "Using the numbers 3, 7, 25, 50, make 96. Use + - * / and each number exactly once."
    assert p.answer == "(50 - 25 + 7) * 3"
    assert p.solution == "<think>\n50 - 25 = 25\n25 + 7 = 32\n32 * 3 = 96\n</think>\n<answer>(50 - 25 + 7) * 3</answer>"
    for p in Countdown().problems("train", 200):
        value, used = evaluate(p.answer)
        assert value == int(p.question.split("make ")[1].split(".")[0]) and 1 <= value <= 100


@pytest.mark.parametrize("task", [Arithmetic(max_digits=2), Countdown()])
def test_split_is_deterministic_and_disjoint(task):
    train = task.problems("train", 2000, seed=0)
    test = task.problems("test", 100, seed=0)
    assert train == task.problems("train", 2000, seed=0)  # same seed, same problems
    assert task.problems("train", 50, seed=1) != train[:50]  # another seed draws others ...
    other = task.problems("train", 2000, seed=1)
    questions = {p.question for p in train + other}
    assert not questions & {p.question for p in test}  # ... never from the held-out set
    assert len({p.question for p in test}) == 100
    # another split seed moves the boundary
    moved = dataclasses.replace(task, split_seed=1).problems("test", 100, seed=0)
    assert {p.question for p in moved} != {p.question for p in test}


def test_held_out_fraction_is_respected():
    keys = [f"{a}+{b}" for a in range(100) for b in range(100)]
    share = sum(held_out(k, 0, 0.1) for k in keys) / len(keys)
    assert 0.09 < share < 0.11


def test_a_space_too_small_for_the_request_says_so():
    with pytest.raises(ValueError, match="problem space is too small"):
        Arithmetic(max_digits=1, ops="+").problems("test", 50)  # 100 problems, ~10 held out


def test_task_specs():
    t = get_task("arithmetic:max_digits=2, ops=+-")
    assert t == Arithmetic(max_digits=2, ops="+-")
    assert get_task("countdown:max_numbers=3").max_numbers == 3
    with pytest.raises(ValueError, match="unknown task 'algebra'; available: arithmetic, countdown"):
        get_task("algebra")
    with pytest.raises(ValueError, match="not field=value with a field of arithmetic"):
        get_task("arithmetic:digits=2")
    with pytest.raises(ValueError, match="max_digits must be int"):
        get_task("arithmetic:max_digits=two")
    with pytest.raises(ValueError, match="ops must be"):
        get_task("arithmetic:ops=/")


class ScriptedLLM:
    """An engine-shaped stand-in answering from a table: the scoring path without a model."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.seen = tokenizer, answers, []

    def generate(self, prompts, params):
        assert params.temperature == 0.0
        self.seen = [self.tokenizer.decode(p) for p in prompts]
        return [RequestOutput(str(i), p, [CompletionOutput(0, a, [], "stop")]) for i, (p, a) in
                enumerate(zip(prompts, self.answers))]


def test_accuracy_scores_engine_outputs(tmp_path):
    from deepmoe.tokenizer import train_bpe

    task = Arithmetic(max_digits=2)
    problems = task.problems("test", 4)
    tok = train_bpe([p.question + p.solution for p in task.problems("train", 100)], 300)
    answers = [problems[0].solution, "<think>x</think><answer>-1000</answer>", "nonsense", problems[3].solution]
    llm = ScriptedLLM(tok, answers)
    r = accuracy(llm, task, problems, max_tokens=64)
    assert (r["n"], r["accuracy"], r["format"]) == (4, 0.5, 0.75)
    assert r["mean_reward"] == pytest.approx((1 + 0.1 + 0 + 1) / 4)
    assert r["examples"][0] == {"question": problems[0].question, "completion": problems[0].solution}
    # prompts went through the chat template, generation prompt included
    assert llm.seen[1] == f"<|bos|><|user|>\n{problems[1].question}<|eos|>\n<|assistant|>\n"
    assert score(task, problems, [p.solution for p in problems])["accuracy"] == 1.0
