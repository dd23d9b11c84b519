"""The batched sampler against the one-row definition: every row of a mixed batch (greedy, temperature,
top-k, top-p, min-p, penalties) gets the token `draw(distribution(row))` gives it alone, with its own
generator, so batching never changes what a seeded request samples."""

import torch

from deepmoe.engine.sampler import distribution, draw, filter_batch, filter_logits, sample, token_generator
from deepmoe.engine.sequence import SamplingParams

PARAMS = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5),
          SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=1.3, min_p=0.1),
          SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02),
          SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
          SamplingParams(temperature=0, repetition_penalty=1.2)]


def test_batched_filters_equal_each_row_alone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(PARAMS), 300, generator=g) * 3
    batch = filter_batch(logits, PARAMS)
    for b, p in enumerate(PARAMS):
        if not p.greedy:
            assert torch.equal(batch[b], filter_logits(logits[b], p)), p


def test_batched_sample_equals_the_per_row_draw():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        logits = torch.randn(len(PARAMS), 300, generator=g) * 2
        histories = [torch.randint(0, 300, (12,), generator=g).tolist() for _ in PARAMS]
        gens = [token_generator(trial, b, "cpu") for b in range(len(PARAMS))]
        tokens, logps = sample(logits, PARAMS, histories, [4] * len(PARAMS), gens)
        for b, p in enumerate(PARAMS):
            logp, probs = distribution(logits[b], p, histories[b], 4)
            assert tokens[b] == draw(logp, probs, token_generator(trial, b, "cpu")), (trial, p)
            torch.testing.assert_close(logps[b], logp)


def test_top_p_of_one_drops_nothing_even_when_rounding_reaches_one():
    # skewed logits: the fp32 cumsum of the sorted probabilities reaches 1.0 hundreds of tokens early
    logits = (torch.randn(30_000, generator=torch.Generator().manual_seed(0)) * 3).expand(2, -1)
    out = filter_batch(logits, [SamplingParams(top_p=1.0), SamplingParams(top_p=0.5)])
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()


def test_tiny_temperatures_draw_the_argmax():
    # logits / 1e-39 overflow fp32 to inf and the softmax of inf is nan: the draw used to be token 0, not the best
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(2)) * 30
    params = [SamplingParams(temperature=t, top_p=0.9) for t in (1e-39, 5e-324, 1e-37, 1e-20, 1e-6)]
    histories = [[1, 2, 3]] * len(params)
    tokens, logps = sample(logits, params, histories, [1] * len(params),
                           [token_generator(0, b, "cpu") for b in range(len(params))])
    assert tokens == logits.argmax(-1).tolist()
    assert torch.isfinite(logps).all()
    for b, p in enumerate(params):  # the one-row path (speculative drafting and verification) agrees
        logp, probs = distribution(logits[b], p, histories[b], 1)
        assert draw(logp, probs, token_generator(0, b, "cpu")) == tokens[b]
    assert SamplingParams(temperature=1e-4).greedy is False  # small but ordinary temperatures still sample
