"""Durable writes: data fsynced before the rename that publishes it, the directory after; a directory
replaced so that a crash at any step leaves the old or the new one, complete, under its name."""

import os
import stat
from pathlib import Path

import pytest
import torch

import deepmoe
from deepmoe import durable
from deepmoe.tokenizer import train_bpe
from deepmoe.train.config import TrainConfig
from deepmoe.train.optim import build_optimizer
from deepmoe.train.state import list_checkpoints, load_trainer_state, remove_interrupted_saves, save_checkpoint

from .conftest import v3_config
from .crashes import record_fs, run_until_complete


TRAIN = TrainConfig(lr=1e-3, steps=10, warmup_steps=0)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["def f(x):\n    return x + 1\n"] * 20, 300)


def checkpoint(run: Path, seed: int, tokenizer, tokens: int) -> deepmoe.DeepSeekModel:
    """Write step-3 of `run` from a model built with `seed`; its state records `tokens`."""
    model = deepmoe.build_model(v3_config(), seed=seed)
    cfg = TRAIN
    save_checkpoint(run, model, tokenizer, build_optimizer(model, cfg), cfg, {"step": 3, "tokens": tokens})
    return model


def same_weights(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_files_and_directories_are_fsynced_around_each_rename(tmp_path, tokenizer, monkeypatch):
    checkpoint(tmp_path, 1, tokenizer, tokens=1)
    events = record_fs(monkeypatch)
    checkpoint(tmp_path, 2, tokenizer, tokens=2)  # replaces step-3: every file and the directory swap
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert renames
    for i in renames:
        _, src, dst = events[i]
        if Path(src).name.startswith("."):  # a temp file or directory being published: its data first
            assert ("fsync", src) in events[:i], f"{src} renamed to {dst} before it was fsynced"
        # then the rename itself, which lives in the destination directory's entries
        assert events[i + 1] == ("fsync", str(Path(dst).parent)), f"{dst}: no directory fsync right after"
    # every file of the checkpoint got there through such a rename (none written in place)
    final = tmp_path / "checkpoints" / "step-0000003"
    published = {Path(e[2]).name for e in events if e[0] == "rename"}
    assert any(e[0] == "rename" and e[2] == str(final) for e in events)  # the directory itself
    files = [p for p in final.rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.json", "tokenizer.json", "state.json", "optimizer.safetensors"} <= {
        p.name for p in files}
    for p in files:
        assert p.name in published, f"{p.relative_to(final)} was written without fsync + rename"
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p  # readable by others, as a shared model should be


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_replacing_a_checkpoint_survives_a_crash_at_every_step(tmp_path, tokenizer, monkeypatch, exchange):
    if not exchange:  # a kernel or file system without RENAME_EXCHANGE: the old copy waits at a side name
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    old = checkpoint(tmp_path / "run", 1, tokenizer, tokens=1).state_dict()
    new = deepmoe.build_model(v3_config(), seed=2).state_dict()
    seen = set()

    def check():
        ckpts = list_checkpoints(tmp_path / "run")  # what a resume sees (it recovers an interrupted swap)
        assert [p.name for p in ckpts] == ["step-0000003"]
        model = deepmoe.load_pretrained(ckpts[0], dtype=torch.float32)
        state = load_trainer_state(ckpts[0], model, build_optimizer(model, TRAIN))
        weights = model.state_dict()
        assert same_weights(weights, old if state["tokens"] == 1 else new)  # one save's files, not a mix
        seen.add(state["tokens"])

    steps = run_until_complete(monkeypatch, lambda: checkpoint(tmp_path / "run", 2, tokenizer, tokens=2), check)
    assert steps > 5 and seen == {1, 2}
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert "step-0000003" in leftovers and ".step-0000003.old" not in leftovers


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_loading_a_replaced_directory_finds_a_complete_one_at_every_step(tmp_path, monkeypatch, exchange):
    """What `deepmoe train` does to RUN/final, read by load_pretrained alone (no recovery step)."""
    if not exchange:
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    old, new = (deepmoe.build_model(v3_config(), seed=s) for s in (1, 2))
    final = tmp_path / "final"
    deepmoe.save_pretrained(old, final)
    seen = []

    def write():
        tmp = tmp_path / f".final.{len(seen)}"
        deepmoe.save_pretrained(new, tmp)
        durable.replace_dir(tmp, final)

    def check():
        got = deepmoe.load_pretrained(final, dtype=torch.float32).state_dict()
        seen.append("old" if same_weights(got, old.state_dict()) else "new")
        assert seen[-1] == "old" or same_weights(got, new.state_dict())

    run_until_complete(monkeypatch, write, check)
    assert seen[0] == "old" and seen[-1] == "new"
    assert not durable.side_name(final).exists()


def test_atomic_write_keeps_the_old_file_until_the_new_one_is_complete(tmp_path):
    f = tmp_path / "a.json"
    durable.atomic_write_text(f, "old")

    def half_write(tmp):
        Path(tmp).write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        durable.atomic_write(f, half_write)
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]  # no temp file left either


def test_mkdir_persists_each_directory_it_creates(tmp_path, monkeypatch):
    events = record_fs(monkeypatch)
    durable.mkdir(tmp_path / "a" / "b")
    assert events == [("fsync", str(tmp_path)), ("fsync", str(tmp_path / "a"))]
    assert (tmp_path / "a" / "b").is_dir()


def test_only_what_interrupted_saves_leave_is_removed(tmp_path):
    run = tmp_path / "run"
    ours = [("checkpoints/.step-0000004.k2x_9abc", "dir"),  # mkdtemp of a checkpoint
            ("checkpoints/.step-0000002.deleting", "dir"),  # remove_dir cut short
            (".final.ab12cd34", "dir"), (".train_config.json.0a1b2c3d.tmp", "file")]  # final/, an atomic write
    theirs = [("checkpoints/.step-0000006.old", "dir"),  # the only complete copy: recover_dir's to restore
              (".final.old", "dir"), (".git", "dir"), (".final.mine", "dir"), ("notes.txt", "file"),
              (".notes.txt.swp", "file"), ("checkpoints/step-0000008", "dir")]
    for name, kind in ours + theirs:
        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"x" * 1000)
        else:
            path.write_text("{}")
    removed = remove_interrupted_saves(run)
    assert sorted(str(p.relative_to(run)) for p in removed) == sorted(name for name, _ in ours)
    assert all(not (run / name).exists() for name, _ in ours)
    assert all((run / name).exists() for name, _ in theirs)
    assert remove_interrupted_saves(run) == []
