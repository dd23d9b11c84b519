"""The training benchmark's accounting: the profiled step split into components (benchmarks/breakdown.py)
and the model-FLOP formula MFU rests on (benchmarks/train_throughput.py), on CPU with the tiny preset."""

import sys
from pathlib import Path

import pytest
import torch

from deepmoe.config import ModelConfig, list_presets
from deepmoe.stats import model_stats
from deepmoe.tokenizer import load_tokenizer
from deepmoe.train.config import TrainConfig, resolve
from deepmoe.train.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from breakdown import COMPONENTS, module_ranges, label_ops, profile_steps  # noqa: E402
from train_throughput import flop_terms, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """The benchmark's trainer (as train_throughput builds it) on a small corpus, 2 layers, 2 x 64 tokens."""
    tmp = tmp_path_factory.mktemp("bench")
    cfg, model_cfg = resolve(TrainConfig(
        preset="tiny", data=str(write_corpus(tmp, n_docs=4, words_per_doc=3000)), cache_dir=str(tmp / "cache"),
        out=str(tmp / "run"), device="cpu", seq_len=64, batch_size=2, steps=10**9, warmup_steps=0, lr=1e-4,
        progress=False, plots=False, sample_tokens=0), False)
    t = Trainer(cfg, model_cfg.replace(num_nextn_predict_layers=0, num_hidden_layers=2))
    t.train_step()  # one-off costs out of the way
    yield t
    t.metrics.close()


def test_components_add_up_to_the_step(trainer):
    b = profile_steps(trainer.train_step, trainer.model, 2, torch.device("cpu"))
    assert set(b.ms) == set(COMPONENTS) and b.steps == 2 and b.idle_ms is None
    assert all(ms >= 0 for ms in b.ms.values())
    # on CPU every microsecond of the step is some op's own time or the step's own (Python) time
    assert sum(b.ms.values()) == pytest.approx(b.step_ms, rel=0.01)
    for component in ("attention", "router", "dispatch/combine", "expert GEMMs", "dense GEMMs", "activations",
                      "norms", "head + loss", "optimizer"):
        assert b.ms[component] > 0, component
    assert b.ms["other"] < 0.25 * b.step_ms  # the rule names where most of the step goes
    # the hooks are gone: unprofiled steps pay nothing
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in trainer.model.modules())


def test_backward_lands_in_the_component_of_its_forward(trainer):
    with module_ranges(trainer.model), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        trainer.train_step()
    nodes = {}
    for e, label in label_ops(p.events()):
        if e.scope == 1:  # an autograd node's event
            nodes.setdefault(e.name, set()).add(label)
    assert nodes["GroupedMmBackward0"] == {"expert GEMMs"}
    assert nodes["MmBackward0"] >= {"dense GEMMs", "router"}
    assert nodes["_LinearCrossEntropyBackward"] == {"head + loss"}  # the chunked head + loss's own node
    assert nodes["IndexSelectBackward0"] == {"dispatch/combine"}  # gathering copies out and back
    assert nodes["SiluBackward0"] == {"activations"}
    assert nodes["RsqrtBackward0"] == {"norms"}
    assert {label for name, labels in nodes.items() if "ScaledDotProduct" in name for label in labels} == {"attention"}


@pytest.mark.parametrize("preset", list_presets())
def test_flop_terms_add_up_to_the_mfu_formula(preset):
    """6 · (activated − embedding) + 3·L·H·T·(d_qk + d_v), split by component without losing a FLOP."""
    cfg, T = ModelConfig.from_preset(preset), 1024
    expected = (6 * (model_stats(cfg).activated - cfg.vocab_size * cfg.hidden_size)
                + 3 * cfg.num_hidden_layers * cfg.num_attention_heads * T * (cfg.qk_head_dim + cfg.v_head_dim))
    terms = flop_terms(cfg, T)
    assert sum(terms.values()) == expected and all(v > 0 for v in terms.values())
    assert terms["head + loss"] == 6 * cfg.vocab_size * cfg.hidden_size


def test_torchao_compare_quantises_the_same_layers_alike(tmp_path, monkeypatch):
    """benchmarks/torchao_compare.py at tiny size (2 layers trained 40 steps on word salad, its held-out
    half): every variant quantises the same projections and decodes through the engine, and the figures
    show the schemes' arithmetic."""
    pytest.importorskip("torchao")
    from torchao_compare import compare  # noqa: E402

    from deepmoe.checkpoint import load_pretrained

    monkeypatch.setenv("DEEPMOE_CACHE", str(tmp_path / "cache"))  # the held-out token stream's cache
    # trained, not random: a random model predicts about uniformly, and its perplexity hardly sees weight error
    cfg, model_cfg = resolve(TrainConfig(
        preset="tiny", data=str(write_corpus(tmp_path, n_docs=4, words_per_doc=2000)),
        cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), device="cpu", seq_len=64, batch_size=8,
        steps=40, warmup_steps=5, lr=3e-3, val_fraction=0.5, progress=False, plots=False, sample_tokens=0,
        eval_every=10**6, checkpoint_every=10**6), False)
    t = Trainer(cfg, model_cfg.replace(num_nextn_predict_layers=0, num_hidden_layers=2))
    for _ in range(cfg.steps):
        t.train_step()
    final = t.write_final()
    t.metrics.close()
    base = load_pretrained(final, dtype=torch.float32, load_mtp=False)
    rows = {r["label"]: r for r in compare(base, load_tokenizer(final), final, 4, 4, 1)}
    assert [r["error"] for r in rows.values()] == [None] * 7
    fp32, ours8, theirs8, ours4, tinygemm4, intx4 = (rows[k] for k in (
        "float32 (not quantised)", "deepmoe int8 g128", "torchao int8 g128", "deepmoe int4 g128",
        "torchao int4 g128 (tinygemm)", "torchao intx int4 g128"))
    assert fp32["max_err"] == 0 and all(r["tok_s"] > 0 for r in rows.values())  # torchao's ran in the engine
    # int8 with groups of 128, absmax/127 (ours) against absmax/127.5 (torchao): the same rounding error to
    # within the scales' ratio, and perplexities within 1e-4 of each other and of fp32 (measured: ~1e-5 and
    # ~4e-5 at perplexity ~956, where int4 moves it by ~1e-3: the tolerance is below what int4 costs)
    assert ours8["rms_err"] == pytest.approx(theirs8["rms_err"], rel=0.05)
    assert theirs8["ppl"] == pytest.approx(ours8["ppl"], rel=1e-4)
    assert ours8["ppl"] == pytest.approx(fp32["ppl"], rel=1e-4)
    # int4: torchao's symmetric intx uses 16 levels (absmax/7.5, codes -8..7) where ours uses 15 (absmax/7),
    # and tinygemm's asymmetric [min, max] / 15 steps are finer still: smaller rounding error, in that order.
    # Perplexities within 0.5% of ours (measured: 0.01% and 0.23%)
    assert tinygemm4["rms_err"] < intx4["rms_err"] < ours4["rms_err"]
    assert intx4["ppl"] == pytest.approx(ours4["ppl"], rel=5e-3)
    assert tinygemm4["ppl"] == pytest.approx(ours4["ppl"], rel=5e-3)
