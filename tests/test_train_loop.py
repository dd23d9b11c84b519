"""End to end `deepmoe train` on a micro model and corpus: outputs, resume bit-identity (in process, after a
SIGKILL mid-step, mid-checkpoint and mid-final), NaN skipping, recovering from a divergence, eval and generate
on the result."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from deepmoe import load_pretrained
from deepmoe.cli import main
from deepmoe.train import loop
from deepmoe.train.config import TrainConfig, resolve
from deepmoe.train.state import list_checkpoints

from .conftest import v3_config, write_code_corpus

STEPS = 12
# values that must be bit-identical between an uninterrupted and a resumed run (not timings)
EXACT = ("loss", "ce", "mtp_loss", "aux_loss", "lr", "grad_norm", "max_vio", "expert_share", "val_loss", "val_bpb")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    corpus = write_code_corpus(root)
    cfg = v3_config(vocab_size=512, rope_scaling=None, max_position_embeddings=64)
    cfg_path = root / "micro.json"
    cfg_path.write_text(json.dumps(cfg.to_hf_dict()))
    args = ["--config", str(cfg_path), "--data", str(corpus), "--cache-dir", str(root / "cache"), "--seq-len", "32",
            "--batch-size", "4", "--grad-accum", "2", "--steps", str(STEPS), "--warmup-steps", "3", "--lr", "3e-3",
            "--aux-loss-alpha", "0.001", "--bias-update-rate", "0.01", "--eval-every", "4", "--eval-batches", "2",
            "--checkpoint-every", "4", "--no-progress", "--sample-tokens", "8", "--no-plots"]
    ref = root / "ref"
    assert main(["train", *args, "--out", str(ref)]) == 0
    return root, args, ref


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    ma, mb = read_metrics(a), read_metrics(b)
    assert [(r["kind"], r["step"]) for r in ma] == [(r["kind"], r["step"]) for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        for key in EXACT:
            assert ra.get(key) == rb.get(key), (ra["kind"], ra["step"], key)
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_outputs(setup):
    root, _, ref = setup
    records = read_metrics(ref)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in val] == [4, 8, 12]  # periodic at 4 and 8, the full split at the end
    assert train[-1]["tokens"] == STEPS * 2 * 4 * 32
    assert train[-1]["ce"] < train[0]["ce"] - 0.5  # it learns
    assert all(r["mtp_loss"] is not None and r["aux_loss"] > 0 and not r["skipped"] for r in train)
    first = train[0]
    assert first["moe_layers"] == [1, 2, 3]  # two main MoE layers, then the MTP block (layer 3)
    assert first["num_hidden_layers"] == 3  # so readers (the plots) can tell the MTP block from a layer
    assert len(first["expert_share"]) == 3 and all(len(s) == 16 for s in first["expert_share"])
    assert all(v >= 0 for v in first["max_vio"]) and len(first["dead_experts"]) == 3
    assert train[0]["lr"] == pytest.approx(1e-3) and train[-1]["lr"] == pytest.approx(3e-3 * 0.316 ** 2)
    assert math.isfinite(val[-1]["val_bpb"]) and val[-1]["val_bpb"] > 0
    # checkpoints: only the newest two are kept, each a complete model directory
    kept = list_checkpoints(ref)
    assert [p.name for p in kept] == ["step-0000008", "step-0000012"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state/state.json",
                 "trainer_state/optimizer.safetensors", "train_config.json"):
        assert (kept[-1] / name).is_file(), name
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["val_loss"] == val[-1]["val_loss"]
    assert summary["sample"].startswith("def ")
    # wall time counts data, validation, checkpoints and final/ too; step time only the optimizer steps
    assert summary["wall_time_s"] > summary["step_time_s"] > 0
    assert summary["step_time_s"] == round(train[-1]["elapsed_s"], 1)
    model = load_pretrained(ref / "final", dtype=torch.float32)
    assert len(model.mtp) == 1
    biases = [b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().max() > 0 for b in biases)  # aux-loss-free balancing moved every router
    saved = TrainConfig.from_json(ref / "train_config.json")
    assert saved.steps == STEPS and saved.grad_accum == 2


def test_resume_in_process_is_bit_identical(setup, monkeypatch):
    root, args, ref = setup
    out = root / "crash-in-process"
    original = loop.Trainer.train_step

    def crash_at_step_7(self):
        if self.state["step"] == 6:
            raise KeyboardInterrupt  # as if interrupted after the step-4 checkpoint
        return original(self)

    monkeypatch.setattr(loop.Trainer, "train_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        main(["train", *args, "--out", str(out)])
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000004"]
    assert main(["train", *args, "--out", str(out), "--resume"]) == 0
    assert_same_run(ref, out)


def test_bf16_compute_weights_resume_bit_identically(setup, monkeypatch):
    """--precision bf16 (bf16 compute copies over fp32 masters, autocast; on CPU here): interrupted after
    the step-4 checkpoint and resumed, every logged value and the final fp32 weights equal the run that was
    never interrupted, and the fp32 run's losses are close but not the same (the copies are in use)."""
    root, args, ref = setup
    args = [*args, "--precision", "bf16"]
    whole, out = root / "bf16", root / "bf16-resumed"
    assert main(["train", *args, "--out", str(whole)]) == 0
    original = loop.Trainer.train_step

    def crash_at_step_7(self):
        if self.state["step"] == 6:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(loop.Trainer, "train_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        main(["train", *args, "--out", str(out)])
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert main(["train", *args, "--out", str(out), "--resume"]) == 0
    assert_same_run(whole, out)
    bf16 = [r["ce"] for r in read_metrics(whole) if r["kind"] == "train"]
    fp32 = [r["ce"] for r in read_metrics(ref) if r["kind"] == "train"]
    assert bf16 != fp32 and max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.1
    weights = load_file(str(whole / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # the masters are what is saved


KILLER = textwrap.dedent("""
    import os, signal, sys
    from deepmoe.cli import main
    from deepmoe.train import loop, state
    mode, kill_step = sys.argv[1], int(sys.argv[2])
    if mode == "step":  # SIGKILL in the middle of the run: no cleanup of any kind runs
        original = loop.Trainer.train_step
        def train_step(self):
            if self.state["step"] == kill_step:
                self.saves.wait()  # the checkpoint before it is on disk, not still being written in the background
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self)
        loop.Trainer.train_step = train_step
    elif mode == "checkpoint":  # SIGKILL halfway through writing a checkpoint: model files written, trainer state not yet
        original = state.save_file
        def save_file(tensors, path, *a, **kw):
            if f"step-{kill_step:07d}" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(tensors, path, *a, **kw)
        state.save_file = save_file
    else:  # SIGKILL once final/ is written but before it is moved into place (the final validation is logged)
        original = loop.write_model_dir
        def write_model_dir(path, *a, **kw):
            original(path, *a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        loop.write_model_dir = write_model_dir
    sys.exit(main(sys.argv[3:]))
""")


def hidden(run):
    return sorted(str(p.relative_to(run)) for p in [*run.glob(".*"), *run.glob("checkpoints/.*")])


@pytest.mark.parametrize("mode,kill_step,resumes_from", [("step", 6, 4), ("checkpoint", 8, 4), ("final", 12, 12)])
def test_resume_after_sigkill_is_bit_identical(setup, mode, kill_step, resumes_from, caplog):
    root, args, ref = setup
    out = root / f"killed-{mode}"
    script = root / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), mode, str(kill_step), "train", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)][-1] == f"step-{resumes_from:07d}"
    left = hidden(out)
    if mode == "checkpoint":  # the half-written checkpoint exists only as a hidden temp directory
        assert [p for p in left if p.startswith("checkpoints/.step-0000008.")] and len(left) == 1
        assert not (out / "checkpoints" / "step-0000008").exists()
    if mode == "final":  # final/ too; and the final validation was logged before the kill
        assert [p for p in left if p.startswith(".final.")] and len(left) == 1
        assert not (out / "final").exists()
        last = read_metrics(out)[-1]
        assert (last["kind"], last["step"], last["full"]) == ("val", 12, True)
    with caplog.at_level(logging.INFO, logger="deepmoe"):
        assert main(["train", *args, "--out", str(out), "--resume"]) == 0
    assert_same_run(ref, out)  # the final validation is logged once, as in the run that was never killed
    assert hidden(out) == []  # what the killed save left is gone, and said so
    if left:
        assert f"removed what {len(left)} interrupted save(s) left in {out}" in caplog.text
        assert all(p in caplog.text for p in left)


def test_refuses_to_overwrite_or_change_a_run(setup, capsys):
    root, args, ref = setup
    assert main(["train", *args, "--out", str(ref)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *args, "--out", str(ref), "--resume", "--seq-len", "16"]) == 2
    assert "would change its data, model or objective: --seq-len" in capsys.readouterr().err
    assert main(["train", *args, "--out", str(root / "nothing-here"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", *args, "--out", str(ref), "--resume"]) == 0  # complete: nothing to do
    assert "nothing to resume" in capsys.readouterr().out


def _trainer(root, args, out, **overrides):
    given = dict(model_config=args[1], data=args[3], cache_dir=args[5], seq_len=32, batch_size=4, steps=STEPS,
                 warmup_steps=3, out=str(out), progress=False, plots=False, sample_tokens=0)
    cfg, model_cfg = resolve(TrainConfig(**(given | overrides)), False)
    return loop.Trainer(cfg, model_cfg)


def _poison_gradients(monkeypatch):
    """From now on every micro-batch leaves NaN gradients; returns the original forward_backward."""
    original = loop.Trainer.forward_backward

    def poisoned(self, x, y, scale):
        result = original(self, x, y, scale)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
        return result

    monkeypatch.setattr(loop.Trainer, "forward_backward", poisoned)
    return original


def test_non_finite_step_is_skipped(setup, monkeypatch):
    root, args, _ = setup
    trainer = _trainer(root, args, root / "nan-once")
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = _poison_gradients(monkeypatch)
    record = trainer.train_step()
    assert record["skipped"] and record["grad_norm"] != record["grad_norm"]  # NaN
    after = trainer.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and routing biases untouched
    assert trainer.state["skipped_steps"] == 1 and trainer.state["step"] == 2
    monkeypatch.setattr(loop.Trainer, "forward_backward", original)
    assert not trainer.train_step()["skipped"] and trainer.state["bad_in_a_row"] == 0
    trainer.metrics.close()


def test_persistent_non_finite_stops_the_run(setup, monkeypatch):
    root, args, _ = setup
    trainer = _trainer(root, args, root / "nan-always", max_bad_steps=3)
    _poison_gradients(monkeypatch)
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(loop.TrainingError, match="non-finite for 3 steps in a row"):
        trainer.train_step()
    trainer.metrics.close()


def test_divergence_names_the_checkpoint_before_it_and_a_resume_may_lower_the_lr(setup, capsys):
    root, args, _ = setup
    out = root / "diverged"
    short = [a if a != str(STEPS) else "4" for a in args]
    assert main(["train", *short, "--out", str(out)]) == 0
    # longer, at a learning rate that wrecks the weights in one update: step 5 measures step-4's weights and
    # updates them; from step 6 on the gradients are zero, then NaN. A checkpoint every step, of which only
    # two are kept, so that both the exploded ones and the pruning of the good one are put to the test.
    blow_up = ["--steps", str(STEPS), "--lr", "1e6", "--max-bad-steps", "3", "--checkpoint-every", "1"]
    assert main(["train", "--out", str(out), "--resume", *blow_up]) == 2
    err = capsys.readouterr().err
    good = out / "checkpoints" / "step-0000004"
    assert "The run blew up at step 6 (" in err and f"The last checkpoint from before it is {good}." in err
    assert f"deepmoe train --out {out} --resume step-0000004 --lr 100000" in err
    saved = [p.name for p in list_checkpoints(out)]
    assert saved[0] == "step-0000004" and len(saved) == 3  # kept beside the two newest, which hold the blow-up
    assert main(["train", "--out", str(out), "--resume", "step-0000004", "--lr", "1e-3", "--checkpoint-every", "4"]) == 0
    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # the diverged steps are gone from the log
    assert all(not r["skipped"] and r["lr"] <= 1e-3 for r in train[4:]) and train[-1]["ce"] < train[3]["ce"]
    assert [p.name for p in list_checkpoints(out)] == ["step-0000008", "step-0000012"]
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # both changes, in the run's config and in the log, with the step they took over from
    history = TrainConfig.from_json(out / "train_config.json").history
    assert [(h["step"], h["changes"]["lr"]) for h in history] == [
        (4, {"from": 3e-3, "to": 1e6}), (4, {"from": 1e6, "to": 1e-3})]
    assert history[0]["changes"]["steps"] == {"from": 4, "to": STEPS}
    assert [(r["step"], r["changes"]) for r in records if r["kind"] == "config"] == [
        (h["step"], h["changes"]) for h in history]
    assert TrainConfig.from_json(out / "final" / "train_config.json").history == history
    assert main(["train", "--out", str(out), "--resume", "step-0000003"]) == 2
    assert "is not a complete checkpoint of the run" in capsys.readouterr().err


def test_resuming_a_copied_finished_run_names_the_copy(setup, capsys):
    root, args, ref = setup
    copy = root / "copied"
    shutil.copytree(ref, copy)
    capsys.readouterr()
    assert main(["train", "--out", str(copy), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"model     {copy / 'final'}\n" in out and str(ref) not in out
    summary = json.loads((ref / "summary.json").read_text())
    assert f"in {summary['wall_time_s']:.0f}s wall ({summary['step_time_s']:.0f}s in steps, " in out


def test_the_progress_bar_closes_before_the_last_checkpoint_and_final_validation(setup, monkeypatch):
    """Closing draws the bar with its overall rate: anything after the last step would inflate s/step."""
    import tqdm.auto

    root, args, _ = setup
    events = []

    class Bar(tqdm.auto.tqdm):
        def update(self, n=1):
            events.append("step")
            return super().update(n)

        def close(self):
            if not getattr(self, "disable", True):  # the first close draws; later ones do nothing
                events.append("close")
            return super().close()

    save, validate = loop.Trainer.save, loop.Trainer.log_validation
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(loop.Trainer, "save", lambda self: events.append("save") or save(self))
    monkeypatch.setattr(loop.Trainer, "log_validation",
                        lambda self, full=False: events.append("full validation" if full else "validation")
                        or validate(self, full))
    short = [a if a != str(STEPS) else "6" for a in args if a != "--no-progress"]
    assert main(["train", *short, "--progress", "--out", str(root / "bar")]) == 0
    assert events == ["step"] * 4 + ["validation", "save"] + ["step"] * 2 + ["close", "save", "full validation"]


def test_eval_and_generate_on_the_result(setup, capsys):
    root, _, ref = setup
    summary = json.loads((ref / "summary.json").read_text())
    capsys.readouterr()
    cache = ["--cache-dir", str(root / "cache")]
    assert main(["eval", "--model", str(ref / "final"), "--batch-size", "4", *cache]) == 0
    out = capsys.readouterr().out
    assert "held-out split" in out
    loss = float(out.split("loss ")[1].split()[0])
    assert loss == pytest.approx(summary["val_loss"], abs=1e-4)  # same split, same sequences as training's
    assert main(["generate", "--model", str(ref / "final"), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    corpus = root / "corpus" / "mod_00.py"
    assert main(["eval", "--model", str(ref / "final"), "--data", str(corpus), "--batch-size", "1", *cache]) == 0
    assert "1 documents" in capsys.readouterr().out


def test_plots_and_capacity_factor_run(setup):
    pytest.importorskip("matplotlib")
    root, args, _ = setup
    out = root / "plots"
    short = [a if a != str(STEPS) else "4" for a in args if a != "--no-plots"]
    assert main(["train", *short, "--out", str(out), "--capacity-factor", "1.0"]) == 0
    assert {"loss.png", "expert_load.png", "max_vio.png"} <= {p.name for p in out.iterdir()}
    assert all(not r["skipped"] for r in read_metrics(out) if r["kind"] == "train")


def test_bad_data_path_is_a_clear_error(setup, capsys):
    root, args, _ = setup
    bad = list(args)
    bad[bad.index("--data") + 1] = str(root / "missing")
    assert main(["train", *bad, "--out", str(root / "bad")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert os.path.isdir(root / "bad") is False
