"""GRPO: the pure functions against hand-computed values, reward checking, and `deepmoe grpo` on a micro
model: it learns a reward, micro-batching does not change the step, the engine runs on the trained
weights, resume is bit-exact, and bad input gets clear errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deepmoe.cli import main
from deepmoe.posttrain.config import GRPOConfig, resolve
from deepmoe.posttrain.grpo import GRPOTrainer, read_prompts
from deepmoe.posttrain.grpo_loss import (STD_EPS, group_advantages, policy_loss_terms, token_logprobs, token_weights,
                                         zero_std_fraction)
from deepmoe.posttrain.rewards import Reward, RewardError, combine, load_reward
from deepmoe.tokenizer import load_tokenizer
from deepmoe.train.state import list_checkpoints

from .posttrain_fixtures import TASK, micro_model_dir


# ---- advantages, weights, the objective ---------------------------------------------------------------
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [1.0, 0.1, 0.1, 0.1]])
    std0 = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    a = group_advantages(r, "group")
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + STD_EPS))
    assert torch.equal(a[1], torch.zeros(4))  # no spread, no signal, whatever the scaling
    mean2, std2 = 1.3 / 4, math.sqrt((0.675 ** 2 + 3 * 0.225 ** 2) / 3)
    assert torch.allclose(a[2], (torch.tensor([1.0, 0.1, 0.1, 0.1]) - mean2) / (std2 + STD_EPS))
    assert torch.allclose(group_advantages(r, "none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    batch_std = float(r.flatten().std())
    assert torch.allclose(group_advantages(r, "batch")[2], (r[2] - mean2) / (batch_std + STD_EPS))
    assert zero_std_fraction(r) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least 2 generations"):
        group_advantages(torch.ones(3, 1))


def test_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # the last: masked
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 99.0, 99.0], [5.0, 5.0, 5.0, 5.0]])
    grpo = (token_weights(mask, "grpo", 8) * loss).sum()
    assert grpo == pytest.approx(((1 + 2 + 3 + 4) / 4 + (10 + 20) / 2) / 2)  # sequence means, over active rows
    dapo = (token_weights(mask, "dapo", 8) * loss).sum()
    assert dapo == pytest.approx((1 + 2 + 3 + 4 + 10 + 20) / 6)
    dr = (token_weights(mask, "dr_grpo", 8) * loss).sum()
    assert dr == pytest.approx((1 + 2 + 3 + 4 + 10 + 20) / (3 * 8))


def test_policy_loss_terms_by_hand():
    old = torch.zeros(5)
    logp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5])).requires_grad_()
    adv = torch.tensor([2.0, 1.0, 1.0, -1.0, -1.0])
    ref = torch.log(torch.tensor([1.0, 1.0, 1.0, 2.0, 0.25]))
    loss, stats = policy_loss_terms(logp, old, adv, ref, epsilon=0.2, epsilon_high=0.3, beta=0.1)
    # ratio (1, 1.5, .5, 1.5, .5) clipped to [0.8, 1.3]; -min(r A, clip(r) A)
    surrogate = torch.tensor([-2.0, -1.3, -0.5, 1.5, 0.8])
    r_ref = torch.tensor([1.0, 1 / 1.5, 2.0, 2 / 1.5, 0.5])  # pi_ref / pi
    k3 = r_ref - torch.log(r_ref) - 1
    assert torch.allclose(loss, surrogate + 0.1 * k3, atol=1e-6)
    assert torch.allclose(stats["kl"], k3, atol=1e-6)
    assert stats["clip_high"].tolist() == [0, 1, 0, 0, 0] and stats["clip_low"].tolist() == [0, 0, 0, 0, 1]
    loss.sum().backward()
    # clipped tokens get no policy gradient, only the KL's: d/dlogp of beta * k3 = beta * (1 - pi_ref / pi)
    g_kl = 0.1 * (1 - r_ref)
    assert torch.allclose(logp.grad[[1, 4]], g_kl[[1, 4]], atol=1e-6)
    assert torch.allclose(logp.grad[[0, 2, 3]], torch.tensor([-2.0, -0.5, 1.5]) + g_kl[[0, 2, 3]], atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_token_logprobs_chunked_equals_plain(chunk):
    torch.manual_seed(0)
    h = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (10,))
    lp, ent = token_logprobs(h, w, t, temperature=0.7, chunk=chunk)
    ref_logits = (h @ w.T) / 0.7
    ref = F.log_softmax(ref_logits, -1).gather(-1, t[:, None]).squeeze(-1)
    assert torch.allclose(lp, ref, atol=1e-5)
    p = ref_logits.softmax(-1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5) and not ent.requires_grad
    g = torch.randn(10)
    gh, gw = torch.autograd.grad((lp * g).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * g).sum(), (h, w))
    assert torch.allclose(gh, rh, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)


# ---- rewards ------------------------------------------------------------------------------------------
def test_rewards_are_checked_and_combined(tmp_path):
    prompts, completions = ["p", "p"], ["a", "bb"]
    fine = Reward("len", lambda p, c, **_: [len(x) for x in c], 0.5)
    only_first = Reward("first", lambda p, c, **_: [1.0, None], 2.0)
    totals, per = combine([fine, only_first], prompts, completions, {})
    assert totals == [0.5 + 2.0, 1.0] and per["first"] == [1.0, None]

    def boom(p, c, **_):
        raise KeyError("gold")

    cases = [(boom, "'boom' raised KeyError"), (lambda p, c, **_: [1.0], "returned 1 values for 2"),
             (lambda p, c, **_: [1.0, float("nan")], "returned nan for completion 1"),
             (lambda p, c, **_: ["1", 1], "returned '1'"), (lambda p, c, **_: 3.0, "not a list")]
    for fn, message in cases:
        with pytest.raises(RewardError, match=message):
            combine([Reward("boom", fn)], prompts, completions, {})
    with pytest.raises(RewardError, match="no reward function applies to completion 1"):
        combine([only_first], prompts, completions, {})

    (tmp_path / "my_rewards.py").write_text("def shout(prompts, completions, **kw):\n"
                                            "    return [float(c.isupper()) for c in completions]\n")
    fn = load_reward(f"{tmp_path / 'my_rewards.py'}:shout")
    assert fn(["x"], ["HI", "hi"]) == [1.0, 0.0]
    assert load_reward("math:fabs")(-2.0) == 2.0  # an importable module
    for spec, message in [("nomodule_xyz:f", "cannot import"), ("math:nothing", "no callable"),
                          (f"{tmp_path}/absent.py:f", "no file"), ("plain", "expected module:function")]:
        with pytest.raises(RewardError, match=message):
            load_reward(spec)


# ---- deepmoe grpo -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return micro_model_dir(tmp_path_factory.mktemp("grpo") / "base")


REWARD_FILE = """
def sevens(prompts, completions, question, **columns):
    # the share of characters that are '7': something a micro model can be taught in a few steps
    assert len(question) == len(completions)
    return [c.count("7") / max(len(c), 1) for c in completions]


def chars(prompts, completions, **columns):
    return [len(c) / 50 for c in completions]  # differs between almost any two completions
"""


def config(base, out, **kw):
    defaults = dict(model=str(base), task=TASK, task_examples=32, out=str(out), batch_size=2, num_generations=4,
                    steps=4, max_new_tokens=12, eval_problems=0, progress=False, plots=False, lr=1e-2,
                    checkpoint_every=2)
    return resolve(GRPOConfig(**{**defaults, **kw}), False)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_it_learns_a_reward(base, tmp_path):
    (tmp_path / "sevens.py").write_text(REWARD_FILE)
    out = tmp_path / "run"
    args = ["grpo", "--model", str(base), "--task", TASK, "--task-examples", "32", "--out", str(out),
            "--batch-size", "2", "--num-generations", "8", "--steps", "12", "--max-new-tokens", "8", "--lr", "3e-2",
            "--rewards", f"{tmp_path / 'sevens.py'}:sevens", "--reward-weights", "0,1", "--eval-problems", "0",
            "--no-progress", "--warmup-steps", "1"]
    assert main(args) == 0
    recs = [r for r in metrics(out) if r["kind"] == "train"]
    sevens = [r[f"reward/{tmp_path / 'sevens.py'}:sevens"] for r in recs]
    assert sum(sevens[-3:]) / 3 > 3 * sum(sevens[:3]) / 3 + 0.05, sevens
    assert all(r["frac_reward_zero_std"] < 1 for r in recs) and recs[0]["ratio"] == pytest.approx(1.0)
    assert (out / "reward.png").is_file() and (out / "length.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_moved"] and summary["reward_last"] > summary["reward_first"]


def test_micro_batches_sum_to_the_whole_step(base, tmp_path, monkeypatch):
    """The step's gradient is the same whether its completions run in one forward or three; the engine
    then decodes with exactly the trained weights (and no stale prefix)."""
    import deepmoe.posttrain.grpo as grpo_module

    (tmp_path / "sevens.py").write_text(REWARD_FILE)
    original, grads = grpo_module.optimizer_update, []

    def recording(model, *args):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return original(model, *args)

    monkeypatch.setattr(grpo_module, "optimizer_update", recording)
    runs = []
    for accum in (1, 3):
        t = GRPOTrainer(config(base, tmp_path / f"a{accum}", grad_accum=accum, steps=1, beta=0.05, num_iterations=2,
                               loss_type="grpo", rewards=(f"{tmp_path / 'sevens.py'}:chars",)))
        runs.append((t, t.train_step()))
    (t1, r1), (t3, r3) = runs
    assert r1["reward"] == r3["reward"] and r1["completion_len"] == r3["completion_len"]  # the same rollouts
    assert r1["frac_reward_zero_std"] < 1 and r1["kl"] > 0  # a signal; the second iteration moved off the start
    assert len(grads) == 4  # two optimizer steps per run
    g1, g3 = grads[0], grads[2]  # the first iteration's, before any update: the same point for both
    assert g1.keys() == g3.keys() and len(g1) > 10
    for name in g1:
        assert torch.allclose(g1[name], g3[name], rtol=1e-4, atol=1e-7), name
    engine = dict(t1.rollout.model.named_parameters())
    assert all(torch.equal(engine[n], p) for n, p in t1.model.named_parameters())
    reference = dict(t1.reference.named_parameters())
    assert not torch.equal(t1.model.model.layers[0].self_attn.o_proj.weight,
                           reference["model.layers.0.self_attn.o_proj.weight"])
    assert not t1.rollout.engine.blocks.by_hash  # the prefix cache was forgotten with the old weights


def test_engine_copy_decodes_like_the_written_model(base, tmp_path):
    """After optimizer steps and syncs, the rollout engine's greedy tokens are a fresh engine's on the model
    GRPO writes: periodic evaluations (engine copy) and the final one (written model) measure one model."""
    from deepmoe.engine.llm import LLM
    from deepmoe.engine.sequence import SamplingParams

    (tmp_path / "sevens.py").write_text(REWARD_FILE)
    trainer = GRPOTrainer(config(base, tmp_path / "run", steps=3, rewards=(f"{tmp_path / 'sevens.py'}:chars",)))
    prompts = trainer.data.train.ids[:3]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    start = [g[0].token_ids for g in trainer.rollout.generate(prompts, 1, greedy, [0] * 3)]
    for _ in range(3):
        trainer.train_step()
    after = [g[0].token_ids for g in trainer.rollout.generate(prompts, 1, greedy, [0] * 3)]
    fresh = [o.token_ids for o in LLM(trainer.write_final(), device="cpu", dtype=torch.float32).generate(prompts, greedy)]
    assert after == fresh and after != start
    # its cache holds one rollout batch at its longest (and a quarter), not the engine's memory-sized default
    longest = max(map(len, trainer.data.train.ids)) + 12
    slots = len(trainer.rollout.engine.blocks.blocks) * trainer.rollout.engine.blocks.block_size
    assert 2 * 4 * longest <= slots <= 2 * 4 * (longest + 16) * 1.25 + 16


def test_resume_is_bit_identical(base, tmp_path, monkeypatch):
    ref_out, out = tmp_path / "ref", tmp_path / "crashed"
    args = ["grpo", "--model", str(base), "--task", TASK, "--task-examples", "32", "--batch-size", "2",
            "--num-generations", "4", "--steps", "4", "--max-new-tokens", "10", "--checkpoint-every", "2",
            "--eval-problems", "2", "--eval-every", "2", "--no-progress", "--no-plots", "--lr", "1e-2"]
    assert main(args + ["--out", str(ref_out)]) == 0
    original = GRPOTrainer.train_step

    def crash_at_step_3(self):
        if self.state["step"] == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(GRPOTrainer, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(out)])
    monkeypatch.setattr(GRPOTrainer, "train_step", original)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"]
    assert main(["grpo", "--out", str(out), "--resume"]) == 0
    ma, mb = metrics(ref_out), metrics(out)
    assert [(r["kind"], r["step"]) for r in ma] == [(r["kind"], r["step"]) for r in mb]
    for ra, rb in zip(ma, mb):
        for key in ("loss", "reward", "completion_len", "entropy", "grad_norm", "accuracy", "lr"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    wa, wb = (load_file(str(r / "final/model.safetensors")) for r in (ref_out, out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_prompt_jsonl_with_columns(base, tmp_path):
    tok = load_tokenizer(base)
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "What is 1 + 2?", "target": "3"}),
             json.dumps({"messages": [{"role": "user", "content": "What is 4 + 4?"}], "target": "8"}),
             "not json", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "x"}]})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:3"):
        read_prompts(str(path), tok)
    prompts, notes = read_prompts(str(path), tok, "skip")
    assert len(prompts) == 2 and prompts.columns == {"target": ["3", "8"]} and len(notes) == 2
    assert "ends with an assistant turn" in notes[1]
    assert prompts.ids[0] == tok.encode("What is 1 + 2?")

    (tmp_path / "r.py").write_text("def has_target(prompts, completions, target, **kw):\n"
                                   "    return [float(t in c) for t, c in zip(target, completions)]\n")
    cfg = config(base, tmp_path / "run", task=None, data=str(path), on_bad_line="skip", batch_size=2, steps=1,
                 rewards=(f"{tmp_path / 'r.py'}:has_target",))
    r = GRPOTrainer(cfg).train_step()
    assert r["reward"] == r[f"reward/{tmp_path / 'r.py'}:has_target"] and "accuracy" not in r


def test_bad_input(base, tmp_path, capsys):
    def run(*extra):
        return main(["grpo", "--model", str(base), "--out", str(tmp_path / "bad"), "--no-progress", *extra])

    assert run("--task", TASK, "--num-generations", "1") != 0
    assert "num_generations must be >= 2" in capsys.readouterr().err
    assert run("--task", "sudoku") != 0
    assert "available: arithmetic, countdown" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert run("--data", str(tmp_path / "p.jsonl")) != 0
    assert "need at least one --rewards" in capsys.readouterr().err
    (tmp_path / "bad.py").write_text("def r(prompts, completions, **kw):\n    return [1.0]\n")
    assert run("--task", TASK, "--task-examples", "32", "--batch-size", "2", "--num-generations", "2",
               "--max-new-tokens", "4", "--eval-problems", "0", "--rewards", f"{tmp_path / 'bad.py'}:r") != 0
    assert f"'{tmp_path / 'bad.py'}:r' returned 1 values for 4 completions" in capsys.readouterr().err
    assert run("--task", TASK, "--reward-weights", "1,2") != 0
    assert "2 reward weights for 1 reward functions" in capsys.readouterr().err
