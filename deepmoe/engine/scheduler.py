"""Continuous batching: which sequences run in the next model step, and how many of their tokens.

Each step has a token budget. Running sequences come first, in arrival order: a decoding sequence needs
one token, a sequence part-way through its prompt gets the next chunk (chunked prefill, so a long prompt
never stalls everyone's decoding). Waiting sequences are then admitted first-come-first-served while
blocks, sequence slots and budget last; the queue head is never skipped, so a long prompt cannot starve.
When a sampled token needs a new block and none is free, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the head of the queue to be recomputed later, keeping
every token it has (the one it sampled in that very step too). A sequence stops ("length") once it holds
more tokens than the whole cache has slots, so each fits alone and the oldest running one always advances:
nothing waits forever.
A decoding sequence with draft tokens (speculative decoding) computes its last token and the drafts in
one go when budget and blocks allow; otherwise the drafts are dropped and it decodes one token.
Pure Python: the model runner executes the plan, `postprocess` applies the sampled tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, starting at seq.num_cached_tokens (drafts included)
    num_draft: int = 0  # of which the last num_draft are seq.draft_token_ids, to be verified

    @property
    def samples(self) -> bool:
        """Whether this step completes the sequence's pending tokens, so its last logits pick a new token."""
        return self.seq.num_cached_tokens + self.num_tokens - self.num_draft == len(self.seq)

    def num_kept(self, num_new_tokens: int) -> int:
        """How many computed tokens stay in the cache, given how many new tokens the step appends: the
        pending tokens plus the kept drafts (every new token but the last is a kept draft)."""
        return self.num_tokens - self.num_draft + max(num_new_tokens - 1, 0)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        capacity = self.blocks.capacity
        if len(seq) + 1 > capacity:
            raise ValueError(f"a prompt of {len(seq)} tokens cannot fit the KV cache ({capacity} tokens)")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget, plan = self.max_num_batched_tokens, []
        for seq in self.running:
            n = min(len(seq) - seq.num_cached_tokens, budget)
            if n <= 0:
                continue
            k = len(seq.draft_token_ids)
            if n == 1 and k and (1 + k > budget or not self.blocks.reserve(seq, len(seq) + k)):
                seq.draft_token_ids, k = [], 0  # no room to verify: decode one token this step
            plan.append(Scheduled(seq, n + k if n == 1 else n, k if n == 1 else 0))
            budget -= plan[-1].num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            self.waiting.popleft()
            seq.status, seq.draft_token_ids = Status.RUNNING, []
            self.running.append(seq)
            n = min(len(seq) - seq.num_cached_tokens, budget)
            plan.append(Scheduled(seq, n))
            budget -= n
        if not plan and self.has_unfinished():  # every sequence fits the cache alone: a bug, not a wait
            raise RuntimeError(f"the scheduler can make no progress: running {self.running}, waiting "
                               f"{list(self.waiting)}, {self.blocks.num_free_blocks} free blocks")
        return plan

    def postprocess(self, plan: list[Scheduled], new_tokens: dict[int, list[int]],
                    eos_token_id: int | None) -> list[Sequence]:
        """Record the computed tokens, append each sequence's new tokens (seq_id → the accepted drafts and
        one sampled token), apply the token-level stop rules, then give the new tokens blocks; returns the
        sequences that finished. Every sequence's tokens are appended before any block is handed out, so one
        preempted to make room for another keeps what it sampled this step: dropping it would sample the
        position again after recompute (a second logprob entry, a second draw, its verified drafts counted
        twice)."""
        finished, grown = [], []
        for item in plan:
            seq = item.seq
            tokens = new_tokens.get(seq.seq_id, []) if item.samples else []
            # rejected drafts were computed but are not part of the sequence: their slots get overwritten
            seq.num_cached_tokens += item.num_kept(len(tokens))
            seq.draft_token_ids = []
            for token in tokens:
                seq.append(token)
                reason = self._stop_reason(seq, token, eos_token_id)
                if reason:
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
            else:
                grown.append((seq, len(tokens)))
        for seq, num_new in grown:
            if num_new and seq.status is Status.RUNNING:  # not preempted for one before it
                self._make_room(seq, num_new)
            if seq.status is Status.RUNNING:
                self.blocks.commit(seq)
        return finished

    def _make_room(self, seq: Sequence, num_new: int) -> None:
        """Blocks for seq's num_new newest tokens, preempting the latest arrivals (possibly seq itself) if
        needed. seq fits the whole cache (the stop rules see to it), so once those before it are done it
        runs alone."""
        while not self.blocks.can_append(seq):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return
        self.blocks.append(seq, num_new)

    def _stop_reason(self, seq: Sequence, token: int, eos_token_id: int | None) -> str | None:
        p = seq.params
        if (token == eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_completion_tokens >= p.max_tokens:
            return "length"
        if self.max_model_len is not None and len(seq) >= self.max_model_len:
            return "length"
        if len(seq) > self.blocks.capacity:  # its last token has no slot even with the cache to itself
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (a stop rule, a stop string found by the caller, or an abort) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.deallocate(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft_token_ids = []
        self.blocks.deallocate(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
