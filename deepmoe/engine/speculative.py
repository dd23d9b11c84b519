"""Speculative decoding's verification step: which draft tokens to keep, as pure functions.

The MTP layer proposes a draft token from its own distribution q; the main model then scores the last
token and the drafts in one forward, giving the target distribution p at every draft position and one
past them. At each position the target draws its token exactly as plain decoding would (the argmax when
greedy, else with the noise of that position's own generator), and the draft is kept while it equals that
token. So the output is the non-speculative output token for token, for sampling as much as for greedy:
it does not depend on whether a draft was there to verify (a preempted sequence loses its draft, a full
cache or step drops it). The draft is drawn with the same noise as the target at its position, which
couples the two draws (Gumbel-max coupling): equal distributions always agree, close ones usually do.
This keeps fewer drafts than rejection sampling's Σ min(p, q) when p and q are far apart, in exchange for
that reproducibility.
"""

from __future__ import annotations

import torch

from .sampler import distribution, draw
from .sequence import SamplingParams


def propose(logits: torch.Tensor, p: SamplingParams, history: list[int], prompt_len: int,
            generator: torch.Generator | None) -> int:
    """The draft model's logits (V,) → a draft token, with the request's own penalties, temperature and
    filters and the draft position's generator, so it matches the target's draw when the models agree."""
    return draw(*distribution(logits, p, history, prompt_len), generator)


def verify(target_logits: torch.Tensor, p: SamplingParams, history: list[int], prompt_len: int,
           drafts: list[int], generators: list[torch.Generator | None]) -> tuple[list[int], list[torch.Tensor]]:
    """target_logits (k+1, V): the main model's logits after the last token and after each of the k drafts;
    generators: one per position, as plain decoding would use there.
    → the tokens to append (the kept drafts, then the target's own token at the first mismatch, or one
    bonus token after them all: 1 .. k+1 of them) and the target log-probabilities (V,) each was chosen
    under."""
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    for j, logits in enumerate(target_logits):
        logp, probs = distribution(logits, p, history + tokens, prompt_len)  # penalties see kept drafts
        logprobs.append(logp)
        tokens.append(draw(logp, probs, generators[j]))
        if j == len(drafts) or tokens[-1] != drafts[j]:
            break
    return tokens, logprobs
