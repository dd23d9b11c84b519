"""The recipe's pure parts: learning-rate schedules, losses, expert-load accounting, bias balancing,
capacity-factor token dropping, and the transforms (activation checkpointing) against plain execution."""

import math

import pytest
import torch

from deepmoe.model import build_model
from deepmoe.model.experts import drop_over_capacity
from deepmoe.model.moe import MoE
from deepmoe.model.router import Routing
from deepmoe.train.balance import expert_counts, load_metrics, moe_layers, update_bias
from deepmoe.train.config import TrainConfig, resolve
from deepmoe.train.losses import cross_entropy, mtp_loss, sequence_balance_loss
from deepmoe.train.optim import build_optimizer, lr_at
from deepmoe.train.transforms import apply_activation_checkpointing

from .conftest import v3_config


def cfg_for(**kw) -> TrainConfig:
    return resolve(TrainConfig(preset="tiny", device="cpu", steps=100, warmup_steps=10, lr=1e-3, **kw), False)[0]


def test_lr_warmup_then_multistep():
    cfg = cfg_for(schedule="multistep")
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(79, cfg) == pytest.approx(1e-3)
    assert lr_at(80, cfg) == pytest.approx(0.316e-3)  # DeepSeek: 31.6% at 80% of the run
    assert lr_at(90, cfg) == pytest.approx(0.316 ** 2 * 1e-3)  # and ~10% at 90%
    assert lr_at(99, cfg) == pytest.approx(0.316 ** 2 * 1e-3)


def test_lr_cosine_and_constant():
    cfg = cfg_for(schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)  # halfway: midpoint of peak and floor
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))
    const = cfg_for(schedule="constant")
    assert lr_at(10, const) == lr_at(99, const) == pytest.approx(1e-3)


def test_config_validation_and_defaults():
    cfg, model_cfg = resolve(TrainConfig(), cuda_available=False)
    assert cfg.preset == "tiny" and cfg.device == "cpu" and (cfg.seq_len, cfg.batch_size) == (256, 8)
    assert cfg.aux_loss_alpha == model_cfg.aux_loss_alpha and cfg.out.endswith("tiny")
    assert resolve(TrainConfig(), cuda_available=True)[0].preset == "ref-813M"
    with pytest.raises(ValueError, match="schedule"):
        resolve(TrainConfig(schedule="linear"), False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        resolve(TrainConfig(seq_len=4096), False)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve(TrainConfig(preset="nope"), False)
    again = TrainConfig.from_dict(cfg.to_dict() | {"future_key": 1})
    assert again.to_dict() == cfg.to_dict() | {"future_key": 1}


def test_optimizer_groups_skip_decay_on_vectors():
    model = build_model(v3_config())
    opt = build_optimizer(model, cfg_for(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_cross_entropy_and_mtp_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ref = -logits.log_softmax(-1).gather(-1, y[..., None]).mean()
    assert cross_entropy(logits, y).item() == pytest.approx(ref.item(), rel=1e-6)
    # depth k has T-k positions whose targets are y[:, k:]
    d1, d2 = torch.randn(2, 4, 11), torch.randn(2, 3, 11)
    expect = (cross_entropy(d1, y[:, 1:]) + cross_entropy(d2, y[:, 2:])) / 2
    assert mtp_loss([d1, d2], y).item() == pytest.approx(expect.item(), rel=1e-6)
    assert mtp_loss([], y) is None


def test_sequence_balance_loss_matches_definition():
    torch.manual_seed(0)
    B, T, E, k = 3, 7, 8, 2
    scores = torch.rand(B * T, E)
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(B * T)])
    r = Routing(torch.ones(B * T, k), indices, scores)
    ref = 0.0
    for b in range(B):
        s = scores.view(B, T, E)[b]
        s = s / s.sum(-1, keepdim=True)
        for i in range(E):
            f = E / (k * T) * sum(int(i in indices.view(B, T, k)[b, t]) for t in range(T))
            ref += f * s[:, i].mean().item()
    assert sequence_balance_loss(r, B, E, k).item() == pytest.approx(ref / B, rel=1e-5)
    # perfectly balanced routing with uniform scores gives exactly 1
    uni = Routing(torch.ones(E, 1), torch.arange(E)[:, None], torch.full((E, E), 0.3))
    assert sequence_balance_loss(uni, 1, E, 1).item() == pytest.approx(1.0)


def test_load_metrics_and_bias_update():
    counts = torch.tensor([[4, 4, 4, 4], [8, 4, 4, 0]])
    m = load_metrics(counts)
    assert m["max_vio"] == pytest.approx([0.0, 1.0])
    assert m["min_share"] == pytest.approx([0.25, 0.0]) and m["max_share"] == pytest.approx([0.25, 0.5])
    assert m["dead_experts"] == [0, 1]
    assert [sum(row) for row in m["expert_share"]] == pytest.approx([1.0, 1.0])

    model = build_model(v3_config(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2))
    layers = moe_layers(model)
    assert len(layers) == 3  # 2 MoE layers in the main stack + the MTP block
    loads = torch.tensor([[8, 4, 4, 0], [4, 4, 4, 4], [1, 2, 3, 6]])
    update_bias(layers, loads, rate=0.01)
    assert layers[0].gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.0, 0.0, 0.01])
    assert layers[1].gate.e_score_correction_bias.tolist() == pytest.approx([0.0] * 4)
    assert layers[2].gate.e_score_correction_bias.tolist() == pytest.approx([0.01, 0.01, 0.0, -0.01])
    assert layers[0].gate.e_score_correction_bias.dtype == torch.float32


def test_expert_counts():
    r = Routing(torch.ones(3, 2), torch.tensor([[0, 1], [1, 2], [1, 3]]), torch.zeros(3, 4))
    assert expert_counts([r, r], 4).tolist() == [[1, 3, 1, 1]] * 2


def kept_copies(indices: torch.Tensor, weights: torch.Tensor, capacity: int, n_experts: int) -> list[list[int]]:
    """The definition of capacity dropping, as a plain loop: per expert, its token copies (flat positions
    n·k + j) by routing weight, highest first, ties by position; the first `capacity` stay."""
    flat, w = indices.flatten().tolist(), weights.flatten().tolist()
    out = []
    for e in range(n_experts):
        mine = [p for p in range(len(flat)) if flat[p] == e]
        mine.sort(key=lambda p: (-w[p], p))
        out.append(mine[:capacity])
    return out


def test_drop_over_capacity_keeps_highest_weights():
    torch.manual_seed(0)
    E, N, k, cap = 4, 10, 2, 3
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    weights = torch.randint(1, 4, (N, k)) / 4  # few distinct values: ties decide places
    order, counts = drop_over_capacity(indices.flatten(), weights.flatten(), cap, E)
    expect = kept_copies(indices, weights, cap, E)
    assert counts.tolist() == [len(kept) for kept in expect]
    assert order.tolist() == [p for kept in expect for p in kept]  # grouped by expert, in that order
    assert any(len(kept) < (indices == e).sum() for e, kept in enumerate(expect))  # something was dropped


def test_moe_capacity_factor_matches_reference_and_dropless_limit():
    cfg = v3_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, n_shared_experts=0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 12, cfg.hidden_size)
    routing = moe.gate(x.view(-1, cfg.hidden_size))
    dropless = moe(x)
    assert torch.allclose(moe(x, capacity_factor=float(cfg.n_routed_experts)), dropless)  # cap >= all copies
    y = moe(x, capacity_factor=0.5)  # capacity ceil(0.5 · 12·2 / 8) = 2 copies per expert
    # token by token over the kept copies only: SwiGLU expert output times its routing weight
    e = moe.experts
    xs, k = x.view(12, -1), cfg.num_experts_per_tok
    ref = torch.zeros(12, cfg.hidden_size)
    for p in (p for kept in kept_copies(routing.indices, routing.weights, 2, 8) for p in kept):
        n, j = divmod(p, k)
        ex = routing.indices[n, j]
        h = torch.nn.functional.silu(xs[n] @ e.gate_proj[ex].T) * (xs[n] @ e.up_proj[ex].T)
        ref[n] += routing.weights[n, j] * (h @ e.down_proj[ex].T)
    assert torch.allclose(y.view(12, -1), ref, atol=1e-6)
    assert not torch.allclose(y, dropless)  # something was dropped


def test_activation_checkpointing_same_loss_and_grads():
    cfg = v3_config()
    x = torch.randint(0, cfg.vocab_size, (2, 16))

    def loss_and_grads(checkpointed: bool):
        model = build_model(cfg, seed=3)
        if checkpointed:
            apply_activation_checkpointing(model)
        router_out = []
        hidden = model.hidden_states(x, router_out=router_out)
        loss = cross_entropy(model.lm_head(hidden), x) + 0.3 * mtp_loss(model.mtp_logits(hidden, x, router_out), x)
        routings = router_out[:len(moe_layers(model))]  # the backward recompute appends more later
        loss = loss + 0.01 * sum(sequence_balance_loss(r, 2, cfg.n_routed_experts, cfg.num_experts_per_tok)
                                 for r in routings)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name
    assert math.isfinite(loss_a.item())
