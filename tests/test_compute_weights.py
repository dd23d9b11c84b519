"""bf16 compute weights over fp32 masters: the same numbers as autocast over fp32 weights (which rounds each
weight the same way on every use), without the per-use casts; the masters, their gradients and the
optimizer stay fp32; routers and the embedding are never rounded."""

from types import SimpleNamespace

import torch

from deepmoe.model import build_model
from deepmoe.train.compute_weights import ComputeWeights, compute_weight_names
from deepmoe.train.loop import step_loss

from .conftest import v3_config

STEP = SimpleNamespace(capacity_factor=None, mtp_weight=0.3, aux_loss_alpha=0.01)


def _batch(cfg, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=g), torch.randint(0, cfg.vocab_size, (B, T), generator=g))


def _grads(model, batches, compute=None):
    model.zero_grad(set_to_none=True)
    losses = []
    for x, y in batches:  # gradient accumulation over micro-batches
        with compute.active() if compute else torch.autocast("cpu", enabled=False):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = step_loss(model, x, y, STEP)[0]
            (loss / len(batches)).backward()
        losses.append(loss.detach())
    return losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_which_weights_get_a_bf16_copy():
    model = build_model(v3_config(), seed=0)
    names = compute_weight_names(model)
    assert "lm_head.weight" in names and "model.layers.0.self_attn.kv_b_proj.weight" in names
    assert "model.layers.1.mlp.experts.gate_proj" in names and "mtp.0.eh_proj.weight" in names
    assert not any(n.endswith(("gate.weight", "embed_tokens.weight", "norm.weight", "layernorm.weight")) for n in names)


def test_masters_get_the_autocast_gradients_in_fp32():
    cfg = v3_config()
    model = build_model(cfg, seed=0).train()
    batches = [_batch(cfg, seed=s) for s in (0, 1)]
    want_losses, want = _grads(model, batches)  # autocast over the fp32 parameters
    compute = ComputeWeights(model)
    assert all(c.dtype == torch.bfloat16 for c in compute.copies)
    got_losses, got = _grads(model, batches, compute)
    assert all(torch.equal(a, b) for a, b in zip(got_losses, want_losses))  # the same rounding of every weight
    assert got.keys() == want.keys()
    for name, g in got.items():
        assert g.dtype == torch.float32, name
        # a copy's gradient is bf16 (autocast's cast hands back fp32): one bf16 rounding apart, eps 2^-8
        assert (g - want[name]).norm() <= 2**-8 * want[name].norm(), name
    assert all(c.grad is None for c in compute.copies)  # moved into the masters, not kept twice
    assert all(p.dtype == torch.float32 for p in model.parameters())  # outside active(): the masters


def test_refresh_rounds_the_updated_masters_into_the_same_tensors():
    model = build_model(v3_config(), seed=0)
    compute = ComputeWeights(model)
    before = [c.data_ptr() for c in compute.copies]
    with torch.no_grad():
        for m in compute.masters:
            m.mul_(1.5)
    assert not torch.equal(compute.copies[0], compute.masters[0].to(torch.bfloat16))
    compute.refresh()
    assert [c.data_ptr() for c in compute.copies] == before  # in place: captured graphs stay valid
    assert all(torch.equal(c, m.to(torch.bfloat16)) for c, m in zip(compute.copies, compute.masters))
    with compute.active():
        assert model.lm_head.weight is compute.copies[compute.names.index("lm_head.weight")]
        assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
