"""Grouped expert computation against the plain per-expert definition."""

import pytest
import torch
import torch.nn.functional as F

from deepmoe.model.experts import Experts, _active_groups_mm, _padded_grouped_mm, grouped_mm, grouped_mm_reference

from .conftest import v3_config


@pytest.mark.parametrize("impl", [grouped_mm, _padded_grouped_mm, _active_groups_mm],
                         ids=["grouped_mm", "padded_bmm", "active_groups"])
@pytest.mark.parametrize("counts", [[3, 0, 7, 1, 0, 5], [0, 2, 0, 1, 0, 0]], ids=["many_rows", "decode"])
def test_grouped_mm_matches_reference(impl, counts):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor(counts)  # empty groups included; "decode" has fewer rows than groups
    x = torch.randn(int(counts.sum()), 24, generator=g)
    w = torch.randn(6, 10, 24, generator=g)
    torch.testing.assert_close(impl(x, w, counts), grouped_mm_reference(x, w, counts))


def naive_experts(ex: Experts, x, indices, weights):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):  # token by token, expert by expert: the definition
        for j in range(indices.shape[1]):
            e = indices[n, j]
            h = F.silu(x[n] @ ex.gate_proj[e].T) * (x[n] @ ex.up_proj[e].T)
            out[n] += weights[n, j] * (h @ ex.down_proj[e].T)
    return out


def test_experts_forward_and_backward_match_naive():
    cfg = v3_config()
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(1)
    for p in ex.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    x = torch.randn(20, cfg.hidden_size, generator=g, requires_grad=True)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(20)])
    weights = torch.rand(20, 4, generator=g)
    y = ex(x, indices, weights)
    ref = naive_experts(ex, x, indices, weights)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, ex.gate_proj, ex.down_proj], grad)
    want = torch.autograd.grad(ref, [x, ex.gate_proj, ex.down_proj], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
