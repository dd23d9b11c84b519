"""Quantisation-aware training (deepmoe.quant.qat): the fake-quantised forward is the quantised model's, the
straight-through gradient is the plain gradient at the fake-quantised weights, parameters and checkpoints
are unchanged, and `deepmoe train` / `deepmoe sft --qat` run and quantise."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from deepmoe import build_model, load_pretrained
from deepmoe.cli import main
from deepmoe.model.experts import Experts
from deepmoe.posttrain.config import SFTConfig
from deepmoe.quant import QuantError, QuantScheme, quantize_model, use_reference
from deepmoe.quant.qat import QatExperts, QatLinear, apply_qat
from deepmoe.quant.quantize import target_modules
from deepmoe.quant.scheme import fake_quantize as rtn
from deepmoe.train.compute_weights import ComputeWeights
from deepmoe.train.config import TrainConfig

from .conftest import v3_config
from .posttrain_fixtures import TASK, micro_model_dir

SCHEME = QuantScheme("int4", 32)  # the micro config's inputs are 32, 64 and 128 wide


@pytest.fixture(scope="module")
def model():
    return build_model(v3_config(), seed=0)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed))


def loss(m, x) -> torch.Tensor:
    logits = m(x).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def rounded(model, scheme=SCHEME):
    """A copy of a plain model whose targeted weights hold their fake-quantised values."""
    out = copy.deepcopy(model)
    for name in target_modules(out, scheme):
        m = out.get_submodule(name)
        for p in (["weight"] if isinstance(m, torch.nn.Linear) else ["gate_proj", "up_proj", "down_proj"]):
            getattr(m, p).copy_(rtn(getattr(m, p), scheme))
    return out


def test_qat_swaps_the_modules_quantize_replaces_and_keeps_every_parameter(model):
    qat = copy.deepcopy(model)
    before = dict(qat.named_parameters())
    names = apply_qat(qat, SCHEME)
    assert names == target_modules(model, SCHEME) and len(names) > 0
    assert dict(qat.named_parameters()) == before  # the same Parameter objects, under the same names
    assert isinstance(qat.model.layers[0].self_attn.q_a_proj, QatLinear)
    assert isinstance(qat.model.layers[1].mlp.experts, QatExperts) and isinstance(qat.mtp[0].eh_proj, QatLinear)
    assert type(qat.lm_head) is torch.nn.Linear
    assert type(qat.model.embed_tokens) is torch.nn.Embedding
    assert sum(isinstance(m, Experts) for m in qat.modules()) == sum(isinstance(m, QatExperts) for m in qat.modules())


def test_forward_is_the_quantised_models(model):
    qat, quantized = copy.deepcopy(model), copy.deepcopy(model)
    apply_qat(qat, SCHEME)
    quantize_model(quantized, SCHEME)
    use_reference(quantized)
    with torch.no_grad():
        got, want = qat(ids()), quantized(ids())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, model(ids()), rtol=1e-3, atol=1e-3)  # the rounding is visible


def test_straight_through_gradient_is_the_plain_gradient_at_the_rounded_weights(model):
    qat, plain = copy.deepcopy(model), rounded(model)
    apply_qat(qat, SCHEME)
    a, b = loss(qat, ids()), loss(plain, ids())
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    grads_a = {n: p.grad for n, p in qat.named_parameters() if p.grad is not None}
    grads_b = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 40  # the main stack (the MTP layer is not in this loss)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=0, atol=0, msg=n)


def test_the_weight_is_read_when_called(model):
    """The train loop swaps bf16 compute copies in for the parameters during a step (ComputeWeights.active):
    what gets fake-quantised is whatever the module holds then. Here fp32 copies, halved."""
    qat = copy.deepcopy(model)
    apply_qat(qat, SCHEME)
    compute = ComputeWeights(qat, dtype=torch.float32)
    halved = copy.deepcopy(model)
    with torch.no_grad():
        for copy_, name in zip(compute.copies, compute.names):
            copy_.mul_(0.5)
            halved.get_parameter(name).mul_(0.5)
        with compute.active():
            got = qat(ids())
        torch.testing.assert_close(got, rounded(halved)(ids()), rtol=0, atol=0)


def test_bad_requests(model):
    with pytest.raises(QuantError, match=r"input dimension \d+ is not a multiple of the group size 48"):
        apply_qat(copy.deepcopy(model), QuantScheme("int4", 48))
    with pytest.raises(ValueError, match="--precision fp8"):
        apply_qat(copy.deepcopy(model), QuantScheme("fp8"))
    with pytest.raises(ValueError, match="qat must be one of int8, int4"):
        TrainConfig(qat="int3").validate()
    with pytest.raises(ValueError, match="qat_group_size must be a positive multiple of 8"):
        TrainConfig(qat="int4", qat_group_size=12).validate()
    with pytest.raises(ValueError, match="choose one"):
        TrainConfig(qat="int4", precision="fp8").validate()
    with pytest.raises(ValueError, match="a LoRA run freezes them"):
        SFTConfig(model="m", task=TASK, lora_rank=4, qat="int4").validate()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return micro_model_dir(tmp_path_factory.mktemp("qat") / "base")


def test_sft_with_qat_then_quantize(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sft", "--model", str(base), "--task", TASK, "--task-examples", "32", "--val-examples", "4",
                 "--eval-problems", "0", "--out", str(out), "--batch-size", "4", "--steps", "3", "--lr", "3e-3",
                 "--warmup-steps", "1", "--no-progress", "--no-plots", "--qat", "int4", "--qat-group-size", "32"]) == 0
    assert "qat       int4 g32: " in capsys.readouterr().out
    saved = json.loads((out / "sft_config.json").read_text())
    assert saved["qat"] == "int4" and saved["qat_group_size"] == 32
    final = load_pretrained(out / "final", dtype=torch.float32)
    w = final.model.layers[0].self_attn.q_a_proj.weight
    assert not torch.equal(w, rtn(w, SCHEME))  # the saved weights are the full-precision masters
    assert main(["quantize", str(out / "final"), str(tmp_path / "q"), "--scheme", "int4", "--group-size", "32"]) == 0
    assert main(["sft", "--model", str(base), "--task", TASK, "--out", str(tmp_path / "bad"), "--qat", "int4",
                 "--lora-rank", "4"]) == 2
    assert "a LoRA run freezes them" in capsys.readouterr().err


def test_train_with_qat(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i}.py").write_text("".join(f"value_{j} = compute(x, {i * j % 7})\n" for j in range(30)))
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(v3_config(rope_scaling=None, max_position_embeddings=64).to_hf_dict()))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                 "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
                 "--no-progress", "--no-plots", "--sample-tokens", "0", "--out", str(out),
                 "--qat", "int8", "--qat-group-size", "32"]) == 0
    assert "qat       int8 g32: " in capsys.readouterr().out
    assert json.loads((out / "train_config.json").read_text())["qat"] == "int8"
    assert main(["train", "--config", str(cfg), "--data", str(corpus), "--out", str(tmp_path / "r"), "--qat",
                 "int4", "--precision", "fp8"]) == 2
    assert "choose one" in capsys.readouterr().err
