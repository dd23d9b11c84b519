"""Compiling training: the whole forward + backward of a training step is one graph (no graph break, no
host read), and compiled blocks keep their graphs across training and evaluation (no recompiles)."""

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from deepmoe.model import build_model
from deepmoe.train.loop import step_loss
from deepmoe.train.transforms import apply_compile, eager

from .conftest import v3_config

STEP = SimpleNamespace(capacity_factor=None, mtp_weight=0.3, aux_loss_alpha=0.01)


def _batch(cfg, B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=g), torch.randint(0, cfg.vocab_size, (B, T), generator=g))


def _loss_and_grads(model, fn, x, y, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, ce, mtp, aux, counts = fn(model, x, y, STEP)
    loss.backward()
    return [loss, ce, mtp, aux, counts], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_the_training_step_compiles_as_one_graph(autocast):
    """fullgraph=True fails on any graph break, a host read (.item(), .tolist(), a data-dependent shape)
    included: the MoE dispatch (sort, counts, grouped GEMMs, un-permute) and the losses stay on the device.
    The compiled step's loss and every gradient equal eager's."""
    torch._dynamo.reset()
    cfg = v3_config()
    model = build_model(cfg, seed=0).train()
    x, y = _batch(cfg)
    want, want_grads = _loss_and_grads(model, step_loss, x, y, autocast)
    counters.clear()
    compiled = torch.compile(step_loss, fullgraph=True, backend="aot_eager")
    got, got_grads = _loss_and_grads(model, compiled, x, y, autocast)
    assert sum(counters["graph_break"].values()) == 0
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, **tol)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 20
    for name, w in want_grads.items():
        torch.testing.assert_close(got_grads[name], w, **tol, msg=name)


def test_compiled_blocks_do_not_recompile_between_training_and_evaluation():
    """Training steps, no_grad validation passes and generation, interleaved as a run does: after the first
    of each, nothing compiles again (fail_on_recompile raises otherwise), and compiled outputs equal eager's."""
    torch._dynamo.reset()
    cfg = v3_config()
    model, reference = build_model(cfg, seed=0), build_model(cfg, seed=0)
    apply_compile(model, backend="aot_eager")
    x, y = _batch(cfg)

    def train(m):
        m.train()
        m.zero_grad(set_to_none=True)
        loss = step_loss(m, x, y, STEP)[0]
        loss.backward()
        return loss.detach()

    def validate(m):
        m.eval()
        with torch.no_grad():
            return m(x)

    def generate(m):  # a growing prefix: a new shape every call
        m.eval()
        with torch.no_grad(), eager():
            return [m(x[:, :t])[:, -1] for t in (3, 4, 5)]

    for _ in range(2):  # the first round compiles the training and the inference graphs
        torch.testing.assert_close(train(model), train(reference), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(validate(model), validate(reference), rtol=1e-5, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(2):
            train(model)
            validate(model)
            torch.testing.assert_close(generate(model), generate(reference), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.cuda
def test_the_training_step_compiles_whole_on_cuda_with_bf16_compute_weights():
    """What `deepmoe train --compile` on a GPU runs: bf16 copies of the weights, autocast, and the whole step
    compiled by inductor with fullgraph=True (CUDA grouped GEMMs, no host sync), equal to eager."""
    from deepmoe.train.compute_weights import ComputeWeights

    torch._dynamo.reset()
    cfg = v3_config()
    model = build_model(cfg, seed=0, device="cuda").train()
    compute = ComputeWeights(model)
    x, y = (t.cuda() for t in _batch(cfg, B=4, T=64))

    def run(fn):
        model.zero_grad(set_to_none=True)
        with compute.active(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(model, x, y, STEP)[0]
        with compute.active():
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run(step_loss)
    got, got_grads = run(torch.compile(step_loss, fullgraph=True))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for name, g in want_grads.items():
        assert (got_grads[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name
