"""Speculative decoding's verification step: which draft tokens to keep, as pure functions.

The MTP layer proposes a draft token from its own distribution q; the main model then scores the last
token and the drafts in one forward, giving the target distribution p at every draft position and one
past them. Greedy requests keep drafts while they equal the target's argmax, so the output is exactly
the non-speculative output. Sampling requests use standard speculative rejection sampling (Leviathan et
al. 2023; Chen et al. 2023): keep draft d with probability min(1, p(d)/q(d)); at the first rejection
draw from the residual max(0, p − q) renormalised; after all drafts are kept draw one bonus token from p.
Every emitted token is then distributed exactly as p, whatever q is.
"""

from __future__ import annotations

import torch

from .sampler import distribution, draw
from .sequence import SamplingParams


def propose(logits: torch.Tensor, p: SamplingParams, history: list[int], prompt_len: int,
            generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """The draft model's logits (V,) → a draft token and the distribution q it was drawn from (None when
    greedy), with the request's own penalties, temperature and filters so q is close to the target."""
    logp, q = distribution(logits, p, history, prompt_len)
    return draw(logp, q, generator), q


def verify(target_logits: torch.Tensor, p: SamplingParams, history: list[int], prompt_len: int,
           drafts: list[int], draft_probs: list[torch.Tensor | None], generator: torch.Generator | None
           ) -> tuple[list[int], list[torch.Tensor]]:
    """target_logits (k+1, V): the main model's logits after the last token and after each of the k drafts.
    → the tokens to append (the kept drafts, then one corrected or bonus token: 1 .. k+1 of them) and the
    target log-probabilities (V,) each was chosen under."""
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    for j, logits in enumerate(target_logits):
        logp, probs = distribution(logits, p, history + tokens, prompt_len)  # penalties see kept drafts
        logprobs.append(logp)
        if j == len(drafts):  # every draft kept: one more token from the target, for free
            tokens.append(draw(logp, probs, generator))
            break
        d = drafts[j]
        if probs is None:  # greedy: the target's choice, which is the draft when they agree
            tokens.append(int(logp.argmax()))
            if tokens[-1] != d:
                break
            continue
        q = draft_probs[j]
        u = torch.rand((), generator=generator, device=probs.device)
        if u * q[d] < probs[d]:  # u < p(d) / q(d), without dividing by a q(d) that may be tiny
            tokens.append(d)
            continue
        residual = (probs - q).clamp(min=0)
        if not residual.sum() > 0:  # p == q up to rounding: the residual is empty, p itself is exact
            residual = probs
        tokens.append(int(torch.multinomial(residual, 1, generator=generator)))
        break
    return tokens, logprobs
