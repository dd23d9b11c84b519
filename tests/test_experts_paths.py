"""Every expert formulation against the token-by-token definition, with gradients on: the fast paths are
chosen by what is valid, not by size alone, and the sync-free one compiles whole."""

import pytest
import torch

from deepmoe.model import experts as experts_module
from deepmoe.model.experts import Experts, LowRank, sync_free_experts

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


# ---- low-rank (LoRA) updates of the stacked weights ----------------------------------------------
def _updates(cfg, g, rank=4):
    """Random (gate, up, down) updates: gate and up share A, as a fused gate_up adapter does."""
    E, d, inter = 16, cfg.hidden_size, cfg.moe_intermediate_size
    a_gu = (torch.randn(E, rank, d, generator=g) * 0.1).requires_grad_()
    b_gu = (torch.randn(E, 2 * inter, rank, generator=g) * 0.1).requires_grad_()
    a_d = (torch.randn(E, rank, inter, generator=g) * 0.1).requires_grad_()
    b_d = (torch.randn(E, d, rank, generator=g) * 0.1).requires_grad_()
    updates = (LowRank(a_gu, b_gu[:, :inter], 0.7), LowRank(a_gu, b_gu[:, inter:], 0.7), LowRank(a_d, b_d, 1.5))
    return updates, [a_gu, b_gu, a_d, b_d]


def naive_lora_experts(ex, updates, x, indices, weights):
    """Token by token, expert by expert, with each expert's weight W[e] + scale·B[e]·A[e] formed: the definition."""
    class Effective:
        gate_proj, up_proj, down_proj = (w + u.scale * u.b @ u.a for w, u in
                                         zip((ex.gate_proj, ex.up_proj, ex.down_proj), updates))
    return naive_experts(Effective, x, indices, weights)


# 1 and 3 tokens: the active-groups path (no autograd) and the sync-free gather path; 20: grouped GEMM and
# the sync-free dense path. padded: as where grouped GEMM is unavailable (old torch, fp16, non-Hopper CUDA).
# Rank 4 in fp32 gives the low-rank passes 16-byte rows, so they take grouped GEMM; rank 3 cannot (odd_rank).
@pytest.mark.parametrize("n_tokens", [1, 3, 20])
@pytest.mark.parametrize("path", ["eager", "padded", "sync_free", "odd_rank"])
def test_low_rank_updates_on_every_path_match_naive_with_gradients(n_tokens, path, monkeypatch):
    if path == "padded":
        monkeypatch.setattr(experts_module, "_grouped_mm_ok", lambda *args: False)
    ex, cfg, g = _experts()
    updates, factors = _updates(cfg, g, rank=3 if path == "odd_rank" else 4)
    x = torch.randn(n_tokens, cfg.hidden_size, generator=g, requires_grad=True)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, 4, generator=g)
    sync_free = path == "sync_free"
    y = ex(x, indices, weights, sync_free=sync_free, updates=updates)
    ref = naive_lora_experts(ex, updates, x, indices, weights)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert (y - ex(x, indices, weights, sync_free=sync_free)).abs().max() > 1e-2  # the update does something
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *factors], grad)
    want = torch.autograd.grad(ref, [x, *factors], grad)
    for a, b in zip(got, want, strict=True):  # factor gradients sum over many copies, in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    with torch.no_grad():  # the inference-only paths (CPU decode's active groups) too
        torch.testing.assert_close(ex(x, indices, weights, sync_free=sync_free, updates=updates), ref,
                                   rtol=1e-5, atol=1e-6)


def test_low_rank_updates_follow_autocast():
    """Under autocast the grouped path casts weights and updates alike (autocast does not cover _grouped_mm)."""
    ex, cfg, g = _experts()
    updates, _ = _updates(cfg, g)
    x = torch.randn(20, cfg.hidden_size, generator=g)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(20)])
    weights = torch.rand(20, 4, generator=g)
    with torch.no_grad():
        ref = naive_lora_experts(ex, updates, x, indices, weights)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ex(x, indices, weights, updates=updates)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_zero_update_leaves_every_path_bit_identical():
    """B = 0 (a fresh adapter) adds exactly zero: outputs equal the plain experts' bit for bit."""
    ex, cfg, g = _experts()
    updates, factors = _updates(cfg, g)
    with torch.no_grad():
        for b in factors[1::2]:
            b.zero_()
        for n_tokens, sync_free in [(1, False), (20, False), (1, True), (20, True)]:
            x = torch.randn(n_tokens, cfg.hidden_size, generator=g)
            indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(n_tokens)])
            weights = torch.rand(n_tokens, 4, generator=g)
            assert torch.equal(ex(x, indices, weights, sync_free=sync_free, updates=updates),
                               ex(x, indices, weights, sync_free=sync_free))


def test_sync_free_experts_with_updates_compile_without_graph_breaks():
    torch._dynamo.reset()
    ex, cfg, g = _experts()
    updates, _ = _updates(cfg, g)
    x = torch.randn(8, cfg.hidden_size, generator=g)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(8)])
    weights = torch.rand(8, 4, generator=g)
    compiled = torch.compile(sync_free_experts, fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad():
        got = compiled(x, indices, weights, ex.gate_proj, ex.up_proj, ex.down_proj, updates)
        torch.testing.assert_close(got, naive_lora_experts(ex, updates, x, indices, weights), rtol=1e-5, atol=1e-6)
