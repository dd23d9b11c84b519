"""Token sampling: greedy, top-k, top-p, seeds."""

import torch

from deepmoe.generate import sample_next


def test_greedy_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_next(logits).item() == 0
    seen = {sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1}
    # top_p 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it → tokens {0, 1}
    seen = {sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution_and_is_seeded():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, generator=g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.02)
    again = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
