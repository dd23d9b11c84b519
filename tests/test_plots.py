"""Training plots: metrics.jsonl parsing (torn last line, garbled middle line) and the PNGs drawn from it."""

from __future__ import annotations

import builtins
import json
import math
import random

import numpy as np
import pytest

from deepmoe.train.plots import (
    _downsample,
    _expert_load_figure,
    _max_vio_figure,
    _share_matrix,
    layer_labels,
    read_metrics,
    write_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_STEPS, N_VAL = 50, 3


def train_record(step: int, rng: random.Random, moe_layers=(1, 2), n_experts: int = 8) -> dict:
    shares = []
    for _ in moe_layers:
        w = [rng.random() + 0.1 for _ in range(n_experts)]
        shares.append([v / sum(w) for v in w])
    loss = 6.0 * math.exp(-step / 20) + 2.0 + 0.1 * rng.random()
    return {"kind": "train", "step": step, "tokens": step * 4096, "loss": loss + 0.1, "ce": loss,
            "mtp_loss": loss + 0.3 if moe_layers else None, "aux_loss": None, "lr": 3e-4 * min(1, step / 10),
            "grad_norm": 1.0 + rng.random(), "tok_per_s": 1e5, "elapsed_s": step * 0.04, "skipped": False,
            "moe_layers": list(moe_layers), "max_vio": [max(s) * n_experts - 1 for s in shares],
            "min_share": [min(s) for s in shares], "max_share": [max(s) for s in shares],
            "dead_experts": [0 for _ in shares], "expert_share": shares}


def write_metrics(run_dir, moe_layers=(1, 2), n_steps: int = N_STEPS, torn_tail: bool = True):
    """A run's metrics.jsonl: train steps with one NaN-loss skipped step and one null-loss one, val records
    every 20 steps, blank lines, and (optionally) a last line torn mid-write."""
    rng = random.Random(0)
    lines = []
    for step in range(1, n_steps + 1):
        rec = train_record(step, rng, moe_layers)
        if step == 17:
            rec.update(loss=float("nan"), ce=float("nan"), grad_norm=float("inf"), skipped=True)
        if step == 33:
            rec.update(loss=None, ce=None, mtp_loss=None, grad_norm=None, skipped=True)
        lines.append(json.dumps(rec))  # writes NaN / Infinity literally, as the trainer's json.dumps does
        if step % 20 == 0 or step == n_steps:
            vl = 2.3 + 6.0 * math.exp(-step / 20)
            lines.append(json.dumps({"kind": "val", "step": step, "tokens": step * 4096, "val_loss": vl,
                                     "val_ppl": math.exp(vl), "val_bpb": vl / math.log(2) / 4}))
        if step == 10:
            lines.append("")
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += json.dumps(train_record(n_steps + 1, rng, moe_layers))[:57]
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir / "metrics.jsonl"


def test_read_metrics_counts(tmp_path):
    train, val = read_metrics(write_metrics(tmp_path))
    assert len(train) == N_STEPS and len(val) == N_VAL  # the torn last line is dropped, blank lines skipped
    assert [r["step"] for r in train] == list(range(1, N_STEPS + 1))
    assert math.isnan(train[16]["ce"]) and train[32]["ce"] is None
    assert [r["step"] for r in val] == [20, 40, 50]


def test_garbled_middle_line_raises(tmp_path):
    path = write_metrics(tmp_path, torn_tail=False)
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:30]  # line 5 torn, with good records after it: real corruption, not a crash tail
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:5\b"):
        read_metrics(path)


def assert_png(path):
    image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_write_plots_moe(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path)
    paths = write_plots(tmp_path)
    assert sorted(p.name for p in paths) == ["expert_load.png", "loss.png", "max_vio.png"]
    for p in paths:
        assert p.parent == tmp_path
        assert_png(p)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_write_plots_dense_writes_only_loss(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path, moe_layers=())
    paths = write_plots(tmp_path)
    assert [p.name for p in paths] == ["loss.png"]
    assert_png(paths[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_write_plots_no_train_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "val", "step": 1, "tokens": 1, "val_loss": 3.0,
                                                        "val_ppl": 20.0, "val_bpb": 1.0}) + "\n")
    assert write_plots(tmp_path) == []
    assert not list(tmp_path.glob("*.png"))


def test_write_plots_without_matplotlib(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_plots(tmp_path) == []
    assert not list(tmp_path.glob("*.png"))


def test_share_matrix_is_load_relative_to_uniform(tmp_path):
    train, _ = read_metrics(write_metrics(tmp_path))
    steps, m = _share_matrix(train, 1)
    assert m.shape == (N_STEPS, 8) and steps.tolist() == list(range(1, N_STEPS + 1))
    np.testing.assert_allclose(m.mean(axis=1), 1.0)  # shares sum to 1, so the mean relative load is exactly 1
    np.testing.assert_allclose(m[3], np.asarray(train[3]["expert_share"][1]) * 8)


def test_downsample_caps_columns_and_keeps_means():
    steps = np.arange(1, 1001, dtype=np.float64)
    m = np.random.default_rng(0).random((1000, 8))
    ds_steps, ds = _downsample(steps, m, max_cols=400)
    assert len(ds_steps) == ds.shape[0] <= 400 and ds.shape[1] == 8
    k = math.ceil(1000 / 400)
    np.testing.assert_allclose(ds[0], m[:k].mean(axis=0))
    assert ds_steps[0] == steps[:k].mean() and ds_steps[-1] <= steps[-1]
    same_steps, same = _downsample(steps[:300], m[:300], max_cols=400)
    assert np.array_equal(same_steps, steps[:300]) and np.array_equal(same, m[:300])  # under the cap: as is


def test_mtp_blocks_are_labelled_mtp_not_as_layers():
    rng = random.Random(0)
    # the trainer's records: main layers 0-2 (MoE from 1), then the MTP block, index 3 = num_hidden_layers
    train = [train_record(s, rng, moe_layers=(1, 2, 3)) | {"num_hidden_layers": 3} for s in range(1, 6)]
    assert layer_labels(train) == ["layer 1", "layer 2", "MTP"]
    two = [r | {"moe_layers": [1, 2, 3, 4]} for r in train]
    assert layer_labels(two) == ["layer 1", "layer 2", "MTP 1", "MTP 2"]
    old = [{k: v for k, v in r.items() if k != "num_hidden_layers"} for r in train]
    assert layer_labels(old) == ["layer 1", "layer 2", "layer 3"]  # a log that cannot tell: as before
    pytest.importorskip("matplotlib")
    labels = layer_labels(train)
    titles = [ax.get_title() for ax in _expert_load_figure(train, labels).axes if ax.get_visible()]
    assert titles[:3] == ["layer 1", "layer 2", "MTP"]  # (then the colorbar)
    legend = _max_vio_figure(train, labels).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["layer 1", "layer 2", "MTP"]
