"""Pipeline parallelism (deepmoe/parallel/pipeline.py, pipeline_run.py): the layer split, stages chained in one
process against step_loss, and 2 gloo ranks as 2 stages under the 1F1B schedule against one process.

Tolerance of the 2-stage comparison: the stages run the single process's operations on the same micro-batches;
what differs is the order of some fp32 sums: the schedule adds the micro-batches' gradients and divides once at
the end where one process scales each micro-batch's loss by 1/grad_accum first, the balance loss is summed per
stage, the figures are averaged in float64. A few ulps per step, which AdamW (dividing by the root of tiny
second moments) can magnify in the parameters. Measured over 3 steps of 4 micro-batches (weights ~0.02, moved
up to 0.03 by lr 3e-3): losses within 5e-8 relative, grad norms 5e-7 relative, parameters 3.4e-7 absolute, AdamW
moments 7.5e-9 absolute; validation loss and the greedy sample identical. The bounds: 2e-6 relative on losses,
1e-5 on grad norms, 5e-6 absolute on parameters, 1e-7 on moments (10-40x headroom). A stage's balance loss
left out of its gradient is caught in one process below (router gradients off by far more than 1e-5).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from deepmoe.model import build_model
from deepmoe.parallel.pipeline import Objective, Stage, pipeline_refusals, pipeline_split, split_layers
from deepmoe.train import loop
from deepmoe.train.config import TrainConfig, resolve
from deepmoe.train.state import optimizer_tensors

from .conftest import v3_config, write_code_corpus
from .test_distributed import launch

STEPS, GRAD_ACCUM = 3, 4
LOSS_RTOL, NORM_RTOL, PARAM_ATOL, MOMENT_ATOL = 2e-6, 1e-5, 5e-6, 1e-7


# ---- the split --------------------------------------------------------------------------------------------
def test_split_minimises_the_largest_stage():
    assert split_layers([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert split_layers([1, 1, 1, 1], 1) == [range(0, 4)]
    assert split_layers([1, 1, 1, 1], 4) == [range(i, i + 1) for i in range(4)]
    # a heavy embedding pushes layers to the later stages; a heavy head to the earlier ones
    assert split_layers([1] * 6, 2, first_extra=4) == [range(0, 1), range(1, 6)]
    assert split_layers([1] * 6, 2, last_extra=2) == [range(0, 4), range(4, 6)]
    # unequal layers (dense first, MoE after): the cut balances totals, not layer counts
    assert split_layers([1, 5, 5, 5], 2) == [range(0, 2), range(2, 4)]
    ranges = split_layers([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert [i for r in ranges for i in r] == list(range(8)) and all(len(r) for r in ranges)
    assert max(sum([3, 1, 4, 1, 5, 9, 2, 6][i] for i in r) for r in ranges) == 14  # the best cut (brute force: 14)


def test_split_refuses_more_stages_than_layers():
    with pytest.raises(ValueError, match=r"--pp 5 stages for a model of 4 decoder layers: .* --pp <= 4"):
        split_layers([1] * 4, 5)
    with pytest.raises(ValueError, match="--pp must be >= 1"):
        split_layers([1] * 4, 0)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        pipeline_split(build_model(v3_config(tie_word_embeddings=True), device="meta"), 2)


def test_model_split_counts_the_embedding_and_head():
    model = build_model(v3_config(num_hidden_layers=4), device="meta")
    ranges = pipeline_split(model, 2)
    assert [i for r in ranges for i in r] == [0, 1, 2, 3]
    # layer 0 is dense (first_k_dense_replace=1); the head and MTP (a whole MoE block) outweigh the embedding,
    # so the first stage takes more layers
    assert ranges == [range(0, 3), range(3, 4)]


# ---- stages chained in one process against step_loss -------------------------------------------------------
def _chain(stages: list[Stage], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward through the stages as the schedule does (each stage's inputs are fresh leaves), then backward
    stage by stage with the received gradients; → the last stage's loss."""
    outs, ins = [], []
    inp = (x,)
    for stage in stages:
        if stage.is_last:
            out = stage(*inp)
            loss = stage.loss(out, y)
            break
        out = stage(*inp)
        out = out if isinstance(out, tuple) else (out,)
        outs.append(out)
        inp = tuple(t.detach().requires_grad_() for t in out)
        ins.append(inp)
    loss.backward()
    for out, received in zip(reversed(outs), reversed(ins)):
        torch.autograd.backward(out, [t.grad for t in received])
    return loss


@pytest.mark.parametrize("alpha", [0.01, 0.0], ids=["aux", "no-aux"])
def test_stages_chained_equal_step_loss(alpha):
    from deepmoe.train.loop import step_loss

    torch.manual_seed(0)
    mc = v3_config(vocab_size=128, num_hidden_layers=3, rope_scaling=None, max_position_embeddings=64)
    model = build_model(mc, seed=0)
    x = torch.randint(0, 128, (2, 16))
    y = torch.randint(0, 128, (2, 16))
    cfg = TrainConfig(mtp_weight=0.3, aux_loss_alpha=alpha)
    pipe_model = copy.deepcopy(model)
    loss, ce, mtp, aux, counts = step_loss(model, x, y, cfg)
    loss.backward()
    obj = Objective(0.3, alpha, None)
    stages = [Stage(pipe_model, r, i, 3, obj) for i, r in enumerate([range(0, 1), range(1, 2), range(2, 3)])]
    last = _chain(stages, x, y)
    tally = [s.tally[0] for s in stages]
    torch.testing.assert_close(tally[-1]["ce"], ce.detach())
    torch.testing.assert_close(tally[-1]["mtp"], mtp.detach())
    torch.testing.assert_close(last.detach(), (ce + 0.3 * mtp).detach())
    if alpha:
        torch.testing.assert_close(sum(t["aux"] for t in tally if t["aux"] is not None), aux.detach())
    # layer 0 is dense: no counts there; stages 1 and 2 hold MoE layer 1, and MoE layer 2 + the MTP block
    assert tally[0]["counts"] is None
    assert torch.equal(torch.cat([tally[1]["counts"], tally[2]["counts"]]), counts)
    want = dict(model.named_parameters())
    names = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            names.add(name)
            torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert names == set(want)  # the stages hold every parameter once, under its single-device name
    router = want["model.layers.1.mlp.gate.weight"].grad
    assert router.abs().max() > 0


# ---- 2 stages on 2 gloo ranks against one process -----------------------------------------------------------
@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    corpus = write_code_corpus(root)
    cfg_path = root / "micro.json"
    cfg_path.write_text(json.dumps(v3_config(vocab_size=512, num_hidden_layers=4, rope_scaling=None,
                                             max_position_embeddings=64).to_hf_dict()))
    argv = dict(model_config=str(cfg_path), data=str(corpus), cache_dir=str(root / "cache"), seq_len=32,
                batch_size=2, grad_accum=GRAD_ACCUM, steps=STEPS, warmup_steps=2, lr=3e-3, schedule="constant",
                aux_loss_alpha=0.001, bias_update_rate=0.01, eval_every=100, eval_batches=2, checkpoint_every=100,
                progress=False, sample_tokens=0, plots=False)
    return root, argv


def _train_config(argv: dict, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**argv, "out": str(out), **kw})


def _stage_steps(rank: int, argv: dict, out: str) -> None:
    """STEPS steps as one of 2 stages (activation checkpointing on), then validation, a checkpoint (each stage
    writes its own tensors) and a short greedy sample; each rank writes its records, biases and figures."""
    cfg, model_cfg = resolve(_train_config(argv, Path(out), pp=2, activation_checkpointing=True), False)
    trainer = loop.Trainer(cfg, model_cfg)
    records = [trainer.train_step() for _ in range(STEPS)]
    biases = {str(i): m.gate.e_score_correction_bias.tolist() for i, m in enumerate(trainer.moe) if m is not None}
    val = trainer.validate(2)
    trainer.save()
    trainer.saves.wait()
    sample = trainer.dist.generate(torch.tensor([[5, 6, 7]]), 6)
    trainer.dist.close()
    Path(f"{out}-rank{rank}.json").write_text(json.dumps({"records": records, "biases": biases, "val": val,
                                                          "sample": sample.tolist()}))


@pytest.fixture(scope="module")
def reference(micro):
    """One process, the same config and batches: its records, biases, validation, sample and final weights."""
    from deepmoe.generate import generate

    root, argv = micro
    cfg, model_cfg = resolve(_train_config(argv, root / "one"), False)
    trainer = loop.Trainer(cfg, model_cfg)
    init = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    records = [trainer.train_step() for _ in range(STEPS)]
    biases = {str(i): m.gate.e_score_correction_bias.tolist() for i, m in enumerate(trainer.moe)}
    val = trainer.validate(2)
    trainer.model.eval()
    sample = generate(trainer.model, torch.tensor([[5, 6, 7]]), 6)
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer_tensors(trainer.model, trainer.optimizer).items()}
    trainer.metrics.close()
    return records, biases, val, sample.tolist(), weights, init, moments


def test_two_stages_match_one_process(micro, reference):
    root, argv = micro
    out = root / "pp2"
    launch(2, _stage_steps, argv, str(out))
    ref_records, ref_biases, ref_val, ref_sample, ref_weights, ref_init, ref_moments = reference
    runs = [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in range(2)]
    for run in runs:  # every stage logs the same global figures
        for g, w in zip(run["records"], ref_records, strict=True):
            for key in ("loss", "ce", "mtp_loss", "aux_loss"):
                assert math.isclose(g[key], w[key], rel_tol=LOSS_RTOL), (g["step"], key, g[key], w[key])
            assert math.isclose(g["grad_norm"], w["grad_norm"], rel_tol=NORM_RTOL), (g["grad_norm"], w["grad_norm"])
            assert g["max_vio"] == w["max_vio"] and g["expert_share"] == w["expert_share"]  # exact counts
            assert g["moe_layers"] == w["moe_layers"]
        assert math.isclose(run["val"]["loss"], ref_val["loss"], rel_tol=LOSS_RTOL)
        assert run["sample"] == ref_sample
    # each stage moved its own layers' biases, by every micro-batch's counts: together, the one process's
    held = {**runs[0]["biases"], **runs[1]["biases"]}
    assert not set(runs[0]["biases"]) & set(runs[1]["biases"])
    assert held == ref_biases
    assert any(abs(b) > 0 for layer in ref_biases.values() for b in layer)
    # the stages' checkpoint (each rank its own tensors, DCP), resumed on one process with --pp 1: the one-process
    # model and AdamW moments after the same steps
    cfg, model_cfg = resolve(_train_config(argv, out, pp=1, activation_checkpointing=True), False)
    one = loop.Trainer(cfg, model_cfg, resume=True)
    assert one.state["step"] == STEPS and one.dist is None
    got = one.model.state_dict()
    assert set(got) == set(ref_weights)
    worst = max((got[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst <= PARAM_ATOL, worst
    moved = max((ref_weights[k] - ref_init[k]).abs().max().item() for k in ref_weights)
    assert moved > 100 * PARAM_ATOL  # the steps moved the weights far more than the tolerance
    moments = optimizer_tensors(one.model, one.optimizer)
    assert set(moments) == set(ref_moments)
    for k, v in ref_moments.items():
        torch.testing.assert_close(moments[k], v, rtol=1e-3, atol=MOMENT_ATOL, msg=k)
    one.metrics.close()


def test_pipeline_refusals_name_what_to_change(micro):
    root, argv = micro
    cfg, model_cfg = resolve(_train_config(argv, root / "refused", pp=2, grad_accum=1), False)
    with pytest.raises(ValueError, match=r"rank 0: .*--pp 2 on 1 processes .*--grad-accum 1 < --pp 2"):
        loop.Trainer(cfg, model_cfg)
    assert not (root / "refused").exists()  # refused before anything was written
    refused = pipeline_refusals(_train_config(argv, root / "refused", pp=2, ep=2), 2)
    assert len(refused) == 1 and "--ep > 1 with --pp > 1" in refused[0]
