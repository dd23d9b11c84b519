"""Post-training objectives: masked cross-entropy and balance loss, and the KL of distillation, chunked
against unchunked and against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepmoe.model.router import route
from deepmoe.posttrain.losses import (chunked_kl, kl_divergence, masked_balance_loss, masked_cross_entropy,
                                      masked_expert_counts, masked_mtp_losses)
from deepmoe.train.balance import expert_counts
from deepmoe.train.losses import sequence_balance_loss


def test_masked_cross_entropy_value_and_zero_gradient_off_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    loss = masked_cross_entropy(logits, targets, mask)
    by_hand = sum(-F.log_softmax(logits[b, t], -1)[targets[b, t]] for b, t in mask.nonzero().tolist())
    assert torch.allclose(loss, by_hand)
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0)  # exactly zero, not small
    assert torch.all(logits.grad[mask].abs().sum(-1) > 0)


def test_masked_mtp_losses_shift_the_mask():
    torch.manual_seed(0)
    targets = torch.randint(0, 7, (1, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    depth1 = torch.randn(1, 5, 7)  # position i predicts targets[:, i + 1]
    (loss,) = masked_mtp_losses([depth1], targets, mask)
    expected = sum(-F.log_softmax(depth1[0, i], -1)[targets[0, i + 1]] for i in (2, 3, 4))
    assert torch.allclose(loss, expected)


def routing(B, T, E=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return route(torch.randn(B * T, E, generator=g), top_k=k, scoring_func="sigmoid", norm_topk_prob=True)


def test_masked_balance_loss_equals_the_unmasked_one_without_padding():
    r = routing(3, 10)
    full = torch.ones(3, 10, dtype=torch.bool)
    assert torch.allclose(masked_balance_loss(r, full, 8, 2), sequence_balance_loss(r, 3, 8, 2))
    assert torch.equal(masked_expert_counts([r], [full], 8), expert_counts([r], 8))


def test_masked_balance_loss_ignores_padding():
    """Row 1 is 6 real tokens + 4 pads: its loss is that of the 6-token sequence alone, whatever the pads route to."""
    r = routing(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    row0 = sequence_balance_loss(type(r)(r.weights[:10], r.indices[:10], r.scores[:10]), 1, 8, 2)
    row1 = sequence_balance_loss(type(r)(r.weights[10:16], r.indices[10:16], r.scores[10:16]), 1, 8, 2)
    assert torch.allclose(masked_balance_loss(r, valid, 8, 2), (row0 + row1) / 2)
    counts = masked_expert_counts([r], [valid], 8)
    assert int(counts.sum()) == 16 * 2
    assert torch.equal(counts[0], torch.bincount(torch.cat([r.indices[:10], r.indices[10:16]]).flatten(), minlength=8))


def test_kl_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0]])
    ps, pt = s.softmax(-1)[0].tolist(), t.softmax(-1)[0].tolist()
    fwd = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    rev = sum(p * math.log(p / q) for p, q in zip(ps, pt))
    assert kl_divergence(s, t, kind="forward").item() == pytest.approx(fwd, rel=1e-6)
    assert kl_divergence(s, t, kind="reverse").item() == pytest.approx(rev, rel=1e-6)
    assert kl_divergence(s, t, kind="mix", mix=0.25).item() == pytest.approx(0.25 * fwd + 0.75 * rev, rel=1e-6)
    # temperature softens both, and T² rescales
    ps2, pt2 = (s / 2).softmax(-1)[0].tolist(), (t / 2).softmax(-1)[0].tolist()
    fwd2 = sum(q * math.log(q / p) for p, q in zip(ps2, pt2))
    assert kl_divergence(s, t, temperature=2.0).item() == pytest.approx(4 * fwd2, rel=1e-6)
    assert kl_divergence(t, t).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="kl kind must be one of forward, reverse, mix"):
        kl_divergence(s, t, kind="jsd")


@pytest.mark.parametrize("kind", ["forward", "reverse", "mix"])
def test_chunked_kl_equals_unchunked(kind):
    torch.manual_seed(0)
    N, d_s, d_t, V = 37, 16, 24, 50
    hs = torch.randn(N, d_s, requires_grad=True)
    ws = torch.randn(V, d_s, requires_grad=True)
    ht, wt = torch.randn(N, d_t), torch.randn(V, d_t)
    full = kl_divergence(hs @ ws.T, ht @ wt.T, 1.5, kind, 0.3)
    g_full = torch.autograd.grad(full, (hs, ws))
    for chunk in (1, 8, 37, 100):
        part = chunked_kl(hs, ws, ht, wt, 1.5, kind, 0.3, chunk=chunk)
        g_part = torch.autograd.grad(part, (hs, ws))
        assert torch.allclose(part, full, rtol=1e-5), chunk
        # fp32 rounding of sums taken in another order: relative to the gradient's largest entry
        for a, b in zip(g_part, g_full):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), chunk


def test_chunked_kl_holds_one_chunk_of_logits():
    """Saved for backward: only the chunk inputs (checkpointing), never a (N, V) logits tensor."""
    N, d, V = 64, 8, 1000
    hs = torch.randn(N, d, requires_grad=True)
    ws = torch.randn(V, d, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_kl(hs, ws, torch.randn(N, d), torch.randn(V, d), chunk=16)
    assert saved and all(V not in shape for shape in saved), saved
    loss.backward()
    assert hs.grad is not None and hs.grad.abs().sum() > 0


def test_vocabularies_must_match():
    with pytest.raises(ValueError, match="teacher and student vocabularies differ"):
        chunked_kl(torch.randn(3, 4), torch.randn(10, 4), torch.randn(3, 4), torch.randn(11, 4))
