"""Checkpoints written in the background: the same files as a synchronous save, from a snapshot that training
cannot change, resumable bit for bit, and a failed write reported in the training thread with nothing left
under a step-* name."""

import json
import logging
import threading

import pytest
import torch
from safetensors.torch import load_file

from deepmoe import load_pretrained
from deepmoe.cli import main
from deepmoe.train import async_checkpoint, loop, state
from deepmoe.train.async_checkpoint import CheckpointWriteError, HostCopies
from deepmoe.train.config import TrainConfig, resolve
from deepmoe.train.state import list_checkpoints, save_checkpoint

from .conftest import v3_config, write_code_corpus
from .test_train_loop import assert_same_run

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("async-ckpt")
    corpus = write_code_corpus(root, files=24, modulus=13, lines=10, spread=7)
    # tied embeddings and an MTP layer: the snapshot copies the shared weight once, the writer repeats it
    cfg = v3_config(vocab_size=512, rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=True)
    cfg_path = root / "micro.json"
    cfg_path.write_text(json.dumps(cfg.to_hf_dict()))
    args = ["--config", str(cfg_path), "--data", str(corpus), "--cache-dir", str(root / "cache"), "--seq-len", "32",
            "--batch-size", "4", "--steps", str(STEPS), "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "4",
            "--eval-batches", "1", "--checkpoint-every", "4", "--no-progress", "--sample-tokens", "0", "--no-plots"]
    return root, args


def make_trainer(setup, out, **overrides) -> loop.Trainer:
    root, args = setup
    given = dict(model_config=args[1], data=args[3], cache_dir=args[5], seq_len=32, batch_size=4, steps=STEPS,
                 warmup_steps=2, out=str(root / out), progress=False, plots=False, sample_tokens=0)
    cfg, model_cfg = resolve(TrainConfig(**(given | overrides)), False)
    return loop.Trainer(cfg, model_cfg)


def hold_writes(monkeypatch) -> threading.Event:
    """Background writes start only once the returned event is set (or after 30 s, so a failing test cannot
    leave a writer thread blocked forever)."""
    gate = threading.Event()
    original = async_checkpoint.write_checkpoint

    def write_checkpoint(*a, **kw):
        gate.wait(timeout=30)
        return original(*a, **kw)

    monkeypatch.setattr(async_checkpoint, "write_checkpoint", write_checkpoint)
    return gate


def files(ckpt):
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


def test_host_copies_share_tied_weights_and_own_their_memory():
    w = torch.randn(4, 3)
    original = w.clone()
    copies = HostCopies().copy({"embed": w, "head": w, "other": w[1:]})
    assert copies["embed"] is copies["head"] and copies["other"] is not copies["embed"]
    w.add_(1.0)
    assert torch.equal(copies["embed"], original) and not torch.equal(copies["embed"], w)
    assert copies["other"].is_contiguous() and torch.equal(copies["other"], original[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copies_go_to_pinned_buffers_reused_across_saves():
    host = HostCopies()
    w = torch.randn(64, 32, device="cuda")
    first = host.copy({"w": w})["w"]
    w.mul_(2.0)
    second = host.copy({"w": w})["w"]
    assert first.is_pinned() and second.data_ptr() == first.data_ptr()
    assert torch.equal(second, w.cpu())


def test_a_background_save_writes_the_files_a_synchronous_save_writes(setup):
    trainer = make_trainer(setup, "same-files")
    trainer.train_step()
    trainer.train_step()  # AdamW moments and steps exist, and the bias has moved
    saved = dict(trainer.state, sampler=trainer.sampler.state_dict())
    run = trainer.run_dir
    background = trainer.saves.save(run / "background", trainer.model, trainer.optimizer, trainer.data.tokenizer,
                                    trainer.cfg, saved)
    trainer.saves.wait()
    now = save_checkpoint(run / "now", trainer.model, trainer.data.tokenizer, trainer.optimizer, trainer.cfg, saved)
    trainer.metrics.close()
    a, b = files(background), files(now)
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_config.json", "trainer_state/state.json",
            "trainer_state/optimizer.safetensors"} <= a.keys()
    assert a.keys() == b.keys() and all(a[name] == b[name] for name in a)  # byte for byte
    ta, tb = (load_file(str(c / "trainer_state/optimizer.safetensors")) for c in (background, now))
    assert ta.keys() == tb.keys() and any(k.endswith(".exp_avg_sq") for k in ta) and "rng.torch" in ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads(a["trainer_state/state.json"])["step"] == 2


def test_training_after_save_returns_does_not_change_the_checkpoint(setup, monkeypatch):
    trainer = make_trainer(setup, "isolated")
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {k: v.clone() for k, v in state.optimizer_tensors(trainer.model, trainer.optimizer).items()}
    rng = torch.get_rng_state()
    gate = hold_writes(monkeypatch)
    try:
        ckpt = trainer.save()
        assert not ckpt.exists()  # still waiting to be written
        trainer.train_step()  # changes the weights, moments, steps, bias and RNG in place
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(1.0)
        assert not torch.equal(trainer.model.state_dict()["lm_head.weight"], before["lm_head.weight"])
    finally:
        gate.set()
    trainer.saves.wait()
    trainer.metrics.close()
    loaded = load_pretrained(ckpt, dtype=torch.float32).state_dict()
    assert loaded.keys() == before.keys() and all(torch.equal(loaded[k], before[k]) for k in before)
    tensors = load_file(str(ckpt / state.STATE_TENSORS))
    assert all(torch.equal(tensors[k], v) for k, v in moments.items())
    assert torch.equal(tensors["rng.torch"], rng)
    assert json.loads((ckpt / state.STATE_JSON).read_text())["step"] == 1


def test_resume_from_a_background_checkpoint_is_bit_identical(setup, monkeypatch):
    root, args = setup
    ref, out = root / "ref", root / "interrupted"
    assert main(["train", *args, "--out", str(ref), "--no-async-checkpoint"]) == 0
    # step-4 is held back while steps 5 and 6 change every tensor it holds; then Ctrl-C, which waits for it
    gate = hold_writes(monkeypatch)
    original = loop.Trainer.train_step

    def interrupt_at_step_7(self):
        if self.state["step"] == 6:
            assert not list_checkpoints(self.run_dir)
            gate.set()
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        main(["train", *args, "--out", str(out)])
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000004"]
    assert main(["train", *args, "--out", str(out), "--resume"]) == 0
    assert_same_run(ref, out)


def fail_writing(monkeypatch, step: int) -> None:
    """The write of checkpoint `step` fails once its model files are in the temp directory: a full disk."""
    original = state.save_file

    def save_file(tensors, path, *a, **kw):
        if f"step-{step:07d}" in str(path):
            raise OSError(28, "No space left on device")
        return original(tensors, path, *a, **kw)

    monkeypatch.setattr(state, "save_file", save_file)


def test_a_failed_write_is_raised_by_the_next_save_and_leaves_no_checkpoint(setup, monkeypatch):
    trainer = make_trainer(setup, "failed-write")
    fail_writing(monkeypatch, 1)
    trainer.train_step()
    trainer.save()  # returns: the write fails in the background
    trainer.train_step()
    with pytest.raises(CheckpointWriteError, match=r"checkpoint .*step-0000001 .*No space left on device"):
        trainer.save()
    trainer.saves.wait()  # reported once; step 2 was not saved (the error came first)
    trainer.metrics.close()
    assert list_checkpoints(trainer.run_dir) == []
    assert list((trainer.run_dir / "checkpoints").iterdir()) == []  # and no temp directory either


def test_a_failed_last_write_fails_the_run_before_final(setup, monkeypatch, capsys):
    root, args = setup
    out = root / "failed-at-the-end"
    fail_writing(monkeypatch, STEPS)
    assert main(["train", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"writing checkpoint {out / 'checkpoints' / f'step-{STEPS:07d}'} in the background failed" in err
    assert "--resume" in err
    assert [p.name for p in list_checkpoints(out)] == ["step-0000004"]
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_an_interrupted_run_waits_for_the_write_and_logs_its_failure(setup, monkeypatch, caplog):
    root, args = setup
    out = root / "failed-then-interrupted"
    fail_writing(monkeypatch, 4)
    original = loop.Trainer.train_step

    def interrupt_at_step_6(self):
        if self.state["step"] == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupt_at_step_6)
    with caplog.at_level(logging.ERROR, logger="deepmoe"), pytest.raises(KeyboardInterrupt):
        main(["train", *args, "--out", str(out)])  # the interrupt, not the write's error, is what propagates
    assert f"writing checkpoint {out / 'checkpoints' / 'step-0000004'} in the background failed" in caplog.text
    assert list_checkpoints(out) == [] and list((out / "checkpoints").iterdir()) == []
