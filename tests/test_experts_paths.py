"""Every expert formulation against the token-by-token definition, with gradients on: the fast paths are
chosen by what is valid, not by size alone, and the sync-free one compiles whole."""

import pytest
import torch

from deepmoe.model.experts import Experts, sync_free_experts

from .conftest import v3_config
from .test_experts import naive_experts


def _experts(seed=1):
    cfg = v3_config()
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(seed)
    for p in ex.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return ex, cfg, g


# 1 and 3 tokens: fewer copies (N·k) than the 16 experts (CPU decode's active-groups path, the sync-free
# gather path); 20 tokens: more (grouped/padded path, the sync-free dense path)
@pytest.mark.parametrize("n_tokens", [1, 3, 20])
@pytest.mark.parametrize("sync_free", [False, True], ids=["eager", "sync_free"])
def test_every_path_matches_naive_with_gradients(n_tokens, sync_free):
    ex, cfg, g = _experts()
    x = torch.randn(n_tokens, cfg.hidden_size, generator=g, requires_grad=True)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, 4, generator=g)
    y = ex(x, indices, weights, sync_free=sync_free)  # autograd on: the README's `model(input_ids)`
    ref = naive_experts(ex, x, indices, weights)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, ex.gate_proj, ex.down_proj], grad)
    want = torch.autograd.grad(ref, [x, ex.gate_proj, ex.down_proj], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the inference-only paths without autograd
        torch.testing.assert_close(ex(x, indices, weights, sync_free=sync_free), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_tokens", [2, 8])
def test_sync_free_experts_compile_without_graph_breaks(n_tokens):
    torch._dynamo.reset()
    ex, cfg, g = _experts()
    x = torch.randn(n_tokens, cfg.hidden_size, generator=g)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, 4, generator=g)
    compiled = torch.compile(sync_free_experts, fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad():
        got = compiled(x, indices, weights, ex.gate_proj, ex.up_proj, ex.down_proj)
        torch.testing.assert_close(got, naive_experts(ex, x, indices, weights), rtol=1e-5, atol=1e-6)


def test_capacity_dropping_is_refused_on_the_sync_free_path():
    ex, cfg, g = _experts()
    with pytest.raises(ValueError, match="not sync-free"):
        ex(torch.randn(2, cfg.hidden_size), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), capacity=1,
           sync_free=True)
