"""Continuous batching: which sequences run in the next model step, and how many of their tokens.

Each step has a token budget. Running sequences come first, in arrival order: a decoding sequence needs
one token, a sequence part-way through its prompt gets the next chunk (chunked prefill, so a long prompt
never stalls everyone's decoding). Waiting sequences are then admitted first-come-first-served while
blocks, sequence slots and budget last; the queue head is never skipped, so a long prompt cannot starve.
When a sampled token needs a new block and none is free, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the head of the queue to be recomputed later.
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
    num_tokens: int  # tokens to compute this step, starting at seq.num_cached_tokens

    @property
    def samples(self) -> bool:
        """Whether this step completes the sequence's pending tokens, so its last logits pick a new token."""
        return self.seq.num_cached_tokens + self.num_tokens == len(self.seq)


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
        capacity = len(self.blocks.blocks) * self.blocks.block_size
        if len(seq) + 1 > capacity:
            raise ValueError(f"a prompt of {len(seq)} tokens cannot fit the KV cache ({capacity} tokens)")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget, plan = self.max_num_batched_tokens, []
        for seq in self.running:
            n = min(len(seq) - seq.num_cached_tokens, budget)
            if n > 0:
                plan.append(Scheduled(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_cached_tokens, budget)
            plan.append(Scheduled(seq, n))
            budget -= n
        return plan

    def postprocess(self, plan: list[Scheduled], next_tokens: dict[int, int],
                    eos_token_id: int | None) -> list[Sequence]:
        """Record the computed tokens, append each sampled token (next_tokens: seq_id → token), apply the
        token-level stop rules, and return the sequences that finished this step."""
        finished = []
        for item in plan:
            seq = item.seq
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop: its work is discarded
                continue
            samples = item.samples
            seq.num_cached_tokens += item.num_tokens
            self.blocks.commit(seq)
            if not samples:
                continue
            token = next_tokens[seq.seq_id]
            seq.append(token)
            reason = self._stop_reason(seq, token, eos_token_id)
            if reason:
                self.finish(seq, reason)
                finished.append(seq)
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int, eos_token_id: int | None) -> str | None:
        p = seq.params
        if (token == eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_completion_tokens >= p.max_tokens:
            return "length"
        if self.max_model_len is not None and len(seq) >= self.max_model_len:
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
        self.blocks.deallocate(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
