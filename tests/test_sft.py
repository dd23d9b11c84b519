"""`deepmoe sft` on a micro model: assistant-only gradients, step normalisation, outputs that the engine
and transformers load, bit-exact resume, and clear errors for bad data."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deepmoe.cli import main
from deepmoe.engine.llm import LLM, SamplingParams
from deepmoe.posttrain.config import SFTConfig, resolve
from deepmoe.posttrain.data import Record, build_sft_data
from deepmoe.posttrain.sft import SFTTrainer
from deepmoe.train.state import list_checkpoints

from .posttrain_fixtures import TASK, micro_model_dir

STEPS = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return micro_model_dir(tmp_path_factory.mktemp("sft") / "base")


def common(base, out, *extra):
    return ["sft", "--model", str(base), "--task", TASK, "--task-examples", "64", "--val-examples", "8",
            "--out", str(out), "--batch-size", "4", "--grad-accum", "2", "--steps", str(STEPS), "--lr", "3e-3",
            "--warmup-steps", "2", "--eval-every", "4", "--eval-batches", "1", "--checkpoint-every", "4",
            "--aux-loss-alpha", "0.001", "--bias-update-rate", "0.01", "--no-progress", "--no-plots", *extra]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(common(base, out, "--eval-problems", "4", "--max-new-tokens", "12")) == 0
    return out


def trainer(base, out, **kw):
    cfg = SFTConfig(model=str(base), task=TASK, task_examples=16, val_examples=0, eval_problems=0, out=str(out),
                    batch_size=4, steps=2, progress=False, plots=False, **kw)
    return SFTTrainer(resolve(cfg, False))


def test_prompt_positions_get_exactly_zero_gradient(base, tmp_path):
    """The final hidden state of a system or user position feeds only its own next-token logits, which are
    not trained on: its gradient is exactly zero; every assistant-target position gets a gradient."""
    t = trainer(base, tmp_path / "run", mtp_weight=0.0, aux_loss_alpha=0.0)
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 12 + 30?"},
                         {"role": "assistant", "content": "<think>\n2 + 0\n</think>\n<answer>42</answer>"}]}
    data = build_sft_data(t.tokenizer, 128, [Record(chat, "x"), Record({"prompt": "What is 1 + 1?",
                                                                        "completion": " 2"}, "y")], [])
    b = data.train.batch([0, 1])
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["h"] = output

    handle = t.model.model.norm.register_forward_hook(keep)
    t.forward_backward(b, int(b.target.sum()), [])
    handle.remove()
    grad = captured["h"].grad  # (B, T, d)
    assert torch.all(grad[~b.target] == 0)
    assert torch.all(grad[b.target].abs().sum(-1) > 0)
    assert int((~b.target & b.valid).sum()) > 20  # the prompts are there, and many
    t.metrics.close()


def test_a_step_weighs_every_target_token_alike_however_it_is_split(base, tmp_path):
    """One micro-batch of 4 examples and two of 2 (different padding) accumulate the same gradient."""
    grads = []
    for accum, groups in ((1, [[0, 1, 2, 3]]), (2, [[0, 1], [2, 3]])):
        t = trainer(base, tmp_path / f"split{accum}", grad_accum=accum, aux_loss_alpha=0.01)
        batches = [t.data.train.batch(g) for g in groups]
        n = sum(int(b.target.sum()) for b in batches)
        n_mtp = [sum(int(b.target[:, 1:].sum()) for b in batches)]
        parts = [t.forward_backward(b, n, n_mtp) for b in batches]
        grads.append(({k: p.grad.clone() for k, p in t.model.named_parameters() if p.grad is not None},
                      sum(p.parts["ce"] for p in parts), sum(p.mtp for p in parts)))
        t.metrics.close()
    (g1, ce1, mtp1), (g2, ce2, mtp2) = grads
    assert ce1 == pytest.approx(ce2, rel=1e-5) and mtp1 == pytest.approx(mtp2, rel=1e-5)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6), k


def test_model_hook_limits_training_to_what_it_leaves_trainable(base, tmp_path):
    """The adapter interface: a hook that freezes all but the head; the optimizer holds only the head, and
    one step changes the head and nothing else (LoRA freezes the base the same way)."""
    def freeze_all_but_head(model):
        model.requires_grad_(False)
        model.lm_head.weight.requires_grad_(True)

    cfg = SFTConfig(model=str(base), task=TASK, task_examples=16, val_examples=0, eval_problems=0,
                    out=str(tmp_path / "run"), batch_size=4, steps=2, progress=False, plots=False)
    t = SFTTrainer(resolve(cfg, False), model_hook=freeze_all_but_head)
    assert [p for g in t.optimizer.param_groups for p in g["params"]] == [t.model.lm_head.weight]
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train_step()
    after = t.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the head, and the routers' balancing biases, which are buffers moved by counts, not by gradients
    assert "lm_head.weight" in changed
    assert all(k == "lm_head.weight" or k.endswith("e_score_correction_bias") for k in changed), changed
    t.metrics.close()


def test_run_outputs(reference, base):
    records = metrics(reference)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in val] == [4, 8] and val[-1]["full"]
    assert train[-1]["ce"] < train[0]["ce"] - 0.5  # it learns
    assert all(r["mtp_loss"] is not None and r["aux_loss"] > 0 and 0 <= r["pad_fraction"] < 0.5 for r in train)
    assert train[-1]["target_tokens"] < train[-1]["tokens"]  # prompts are read, not trained on
    assert [p.name for p in list_checkpoints(reference)] == ["step-0000004", "step-0000008"]
    summary = json.loads((reference / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy"):
        assert summary[key]["n"] == 4 and 0.0 <= summary[key]["accuracy"] <= 1.0
    # full fine-tuning: everything trains; fp32 gradients, and AdamW's two moments plus a step per tensor
    assert summary["trainable_parameters"] == summary["parameters"] and summary["trainable_fraction"] == 1.0
    assert summary["grad_bytes"] == 4 * summary["parameters"] and summary["optimizer_state_bytes"] > 8 * summary[
        "parameters"]
    assert summary["lora"] is None and summary["adapter"] is None and "full_finetune_grad_bytes" not in summary
    final = reference / "final"
    assert (final / "sft_config.json").is_file() and not (final / "train_config.json").exists()
    # the engine serves it with the chat template it was trained with
    llm = LLM(final, device="cpu", dtype=torch.float32)
    out = llm.chat([{"role": "user", "content": "What is 3 + 4?"}], SamplingParams(max_tokens=5,
                                                                                               temperature=0))
    assert len(out.token_ids) >= 1
    # aux-loss-free balancing moved the routers; weights changed
    before, after = load_file(str(base / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("e_score_correction_bias"))


def test_transformers_loads_the_result(reference):
    transformers = pytest.importorskip("transformers")
    from deepmoe import load_pretrained

    final = reference / "final"
    ours = load_pretrained(final, dtype=torch.float32, load_mtp=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 50, 70, 11, 9, 200, 5]])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(final)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|bos|><|user|>\nhi<|eos|>\n<|assistant|>\n"


def test_resume_is_bit_identical(reference, base, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    original = SFTTrainer.train_step

    def crash_at_step_7(self):
        if self.state["step"] == 6:
            raise KeyboardInterrupt  # after the step-4 checkpoint
        return original(self)

    monkeypatch.setattr(SFTTrainer, "train_step", crash_at_step_7)
    args = common(base, out, "--eval-problems", "4", "--max-new-tokens", "12")
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(SFTTrainer, "train_step", original)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000004"]
    assert main(["sft", "--out", str(out), "--resume"]) == 0
    ma, mb = metrics(reference), metrics(out)
    assert [(r["kind"], r["step"]) for r in ma] == [(r["kind"], r["step"]) for r in mb]
    for ra, rb in zip(ma, mb):
        for key in ("loss", "ce", "mtp_loss", "aux_loss", "lr", "grad_norm", "expert_share", "val_loss", "tokens"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    wa, wb = load_file(str(reference / "final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (reference, out))
    assert sa["accuracy_before"] == sb["accuracy_before"] and sa["accuracy"] == sb["accuracy"]


def test_resume_refuses_changes_and_overwrites(reference, base, capsys):
    assert main(common(base, reference)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["sft", "--out", str(reference), "--resume", "--lr", "1e-2"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["sft", "--out", str(reference), "--resume"]) == 0
    assert "is complete" in capsys.readouterr().out


def test_chat_jsonl_bad_lines(base, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "What is 1 + 2?"},
                         {"role": "assistant", "content": "<think>\n1 + 2\n</think>\n<answer>3</answer>"}]}
    lines = [json.dumps(good)] * 10 + ['{"messages": [{"role": "user", "content": "no reply"}]}'] + [json.dumps(good)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["sft", "--model", str(base), "--data", str(data), "--batch-size", "4", "--steps", "2", "--no-progress",
            "--no-plots", "--val-fraction", "0"]
    assert main([*args, "--out", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:11: the conversation has no assistant turn" in err and "--on-bad-line skip" in err
    assert not (tmp_path / "stop").exists()
    assert main([*args, "--out", str(tmp_path / "skip"), "--on-bad-line", "skip", "--seq-len", "40"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad lines" in out and f"{data}:11" in out
    assert "11 of 11 examples are longer than seq_len 40 + 1 tokens and were truncated" in out
    assert "11 train examples" in out


def test_usage_errors(base, tmp_path, capsys):
    assert main(["sft", "--model", str(base), "--out", str(tmp_path / "x")]) == 2
    assert "give exactly one of --data FILE and --task NAME" in capsys.readouterr().err
    assert main(["sft", "--task", TASK, "--out", str(tmp_path / "x")]) == 2
    assert "--model DIR is required" in capsys.readouterr().err
    assert main(["sft", "--model", str(base), "--task", "algebra", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'algebra'; available: arithmetic, countdown" in capsys.readouterr().err
    assert main(["sft", "--model", str(base), "--task", TASK, "--out", str(tmp_path / "x"), "--seq-len", "999"]) == 2
    assert "exceeds the model's max_position_embeddings (256)" in capsys.readouterr().err
    assert main(["sft", "--on-bad-line", "ignore"]) == 2  # refused while parsing, in one line
    assert "invalid choice: 'ignore'" in capsys.readouterr().err
    assert main(["sft", str(tmp_path / "missing"), "--task", TASK, "--out", str(tmp_path / "x")]) == 2
    assert "is not a directory" in capsys.readouterr().err
