"""The chunked head + cross-entropy gives the plain loss and gradients (the plain path is the reference)."""

import pytest
import torch
import torch.nn.functional as F

from deepmoe.train.fused_ce import IGNORE, linear_cross_entropy


def _inputs(N=37, d=16, V=50, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, requires_grad=True)
    w = (torch.randn(V, d, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    if ignore:
        t[::5] = IGNORE
    return h, w, t


def _run(fn, h, w, t, autocast=False):
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, t)
    (3 * loss).backward()  # a non-unit incoming gradient must scale both gradients
    return loss.detach(), h.grad.clone(), w.grad.clone()


def _plain(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t, ignore_index=IGNORE)


@pytest.mark.parametrize("chunk", [1, 7, 37, 64])
@pytest.mark.parametrize("ignore", [False, True])
def test_values_and_gradients_equal_the_plain_loss_fp32(chunk, ignore):
    h, w, t = _inputs(ignore=ignore)
    want = _run(_plain, h, w, t)
    got = _run(lambda *a: linear_cross_entropy(*a, chunk=chunk), h, w, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_it_tracks_the_plain_autocast_loss():
    h, w, t = _inputs(N=64, d=32, V=200)
    exact = _run(_plain, h, w, t)
    want = _run(lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE), h, w, t, True)
    got = _run(lambda *a: linear_cross_entropy(*a, chunk=10), h, w, t, True)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # gradients in the leaves' dtype
    for a, b, e in zip(got, want, exact):  # as close to fp32 as autocast's plain path is, or closer
        assert (a - e).abs().max() <= 1.5 * (b - e).abs().max() + 1e-6


def test_without_gradients_it_is_the_loss_alone():
    h, w, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=5), _plain(h, w, t), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="37 hidden rows but 36 targets"):
        linear_cross_entropy(h, w, t[:-1])
