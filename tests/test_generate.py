"""The reference generator's token sampling: greedy, top-k, top-p, seeds, and the engine's parameter checks."""

import pytest
import torch

from deepmoe.generate import generate, sample_next
from deepmoe.model import build_model

from .conftest import v3_config


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


def test_sampling_parameters_are_checked_as_the_engine_checks_them():
    # a negative temperature used to be silently greedy here while LLM and the server refused it
    logits = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_next(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_next(logits, temperature=0.0, top_p=1.5)
    model = build_model(v3_config(), seed=0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):  # before any work, not at the first draw
        generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0.5, top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, torch.tensor([[1, 2, 3]]), -1)
