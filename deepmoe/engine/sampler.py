"""Next-token sampling for a batch of requests, each with its own parameters: pure tensor functions.

Order of operations (as in vLLM/transformers): penalties on the raw logits, then temperature, then the
top-k / top-p / min-p filters, then one draw. Temperature 0 (or below `GREEDY_BELOW`) is greedy. Each draw uses noise of its own,
from a generator seeded by the request's seed and the token's position: a seeded request draws the same
tokens whatever it is batched with, however often it is preempted and recomputed, and whether or not
speculative drafts were verified for it (a draft drawn with its position's noise is the token the target
draws when the two distributions agree; see speculative.py).
"""

from __future__ import annotations

import hashlib

import torch

from .sequence import SamplingParams


def apply_penalties(logits: torch.Tensor, history: list[int], prompt_len: int, p: SamplingParams) -> torch.Tensor:
    """logits (V,) fp32. repetition: divide positive / multiply negative logits of every token seen in the
    prompt or output; presence and frequency: subtract per distinct / per occurrence in the output."""
    if p.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    output = history[prompt_len:]
    if (p.presence_penalty or p.frequency_penalty) and output:
        ids, counts = torch.tensor(output, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits (..., V) with everything outside top-k, top-p and min-p set to -inf."""
    rows = logits.reshape(-1, logits.shape[-1])
    return filter_batch(rows, [p] * rows.shape[0]).view(logits.shape)


def filter_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filter_logits for a batch (B, V), each row with its own parameters, in a fixed number of batched ops
    (no per-row loop, no host read). A row without a filter passes that stage unchanged, so a row gets the
    same values here as alone."""
    dev = logits.device
    # greedy rows are filtered at temperature 1: their draw is never used, and a tiny temperature would overflow
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)[:, None]
    logits = logits / temperature
    if any(p.top_k > 0 for p in params):
        V = logits.shape[-1]
        k = torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in params], device=dev)
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        off = torch.tensor([p.top_k <= 0 for p in params], device=dev)[:, None]
        logits = logits.masked_fill((logits < kth) & ~off, float("-inf"))
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # mass before a token already reaches top_p; rows at top_p = 1 drop nothing (the fp32 cumsum of
        # skewed probabilities reaches 1.0 well before the last token)
        drop = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1.0)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def distribution(logits: torch.Tensor, p: SamplingParams, history: list[int], prompt_len: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One row of logits (V,) → its log-probabilities after penalties (V,), what `logprobs` reports, and
    the distribution to draw from after temperature and filters (V,), None when greedy."""
    row = apply_penalties(logits.float().clone(), history, prompt_len, p)
    return row.log_softmax(-1), (None if p.greedy else filter_logits(row, p).softmax(-1))


def token_generator(seed: int, position: int, device) -> torch.Generator:
    """The generator for the token at `position` of a request seeded `seed`: a hash of the pair, so nearby
    seeds and positions get unrelated streams."""
    digest = hashlib.blake2b(f"{seed},{position}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def draw(logprobs: torch.Tensor, probs: torch.Tensor | None, generator: torch.Generator | None) -> int:
    """The argmax when greedy (probs None), else a sample of probs (V,): argmax of probs / E with E ~ Exp(1)
    per token (the exponential race, equivalent to Gumbel-max). Two distributions drawn with the same noise
    pick the same token whenever they agree, and usually when they are close."""
    if probs is None:
        return int(logprobs.argmax())
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]], prompt_lens: list[int],
           generators: list[torch.Generator | None]) -> tuple[list[int], torch.Tensor]:
    """logits (B, V) → one token per row, and each row's log-probabilities (B, V) of the distribution it was
    drawn from after penalties (before filtering), for logprobs. The whole batch is filtered and drawn on
    the device with batched ops (each row's noise from its own generator, as `draw` makes it), and the
    chosen ids come back in one copy: the step's only host read."""
    logits = logits.float()
    penalised = [b for b, p in enumerate(params)
                 if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty]
    if penalised:
        logits = logits.clone()
        for b in penalised:
            logits[b] = apply_penalties(logits[b], histories[b], prompt_lens[b], params[b])
    tokens = logits.argmax(-1)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = filter_batch(logits[sampled], [params[b] for b in sampled]).softmax(-1)
        noise = torch.empty_like(probs)
        for i, b in enumerate(sampled):
            noise[i].exponential_(generator=generators[b])
        rows = torch.tensor(sampled, device=logits.device)
        tokens = tokens.index_copy(0, rows, (probs / noise).argmax(-1))
    return tokens.tolist(), logits.log_softmax(-1)
