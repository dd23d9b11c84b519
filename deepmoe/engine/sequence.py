"""A request as the engine sees it: its sampling parameters and one growing token sequence.

Plain records, no torch: the scheduler and block manager reason about sequences without touching device
memory. `block_table` lists the KV-cache blocks holding the sequence's latents, in order;
`num_cached_tokens` of its tokens already have their latents in the cache (prefix-cache hits and
computed prefill chunks); the rest still has to go through the model. `draft_token_ids` are speculative
guesses at the tokens after the last one (from the MTP layers), not yet part of the sequence.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

# Below this temperature a draw is the argmax (as in vLLM): logits / T overflows fp32 once |logit| / T passes
# 3.4e38 (T = 1e-37 for a logit of 30) and the softmax turns the inf into nan; long before that the draw is
# already the argmax but for exact ties (a gap of 1e-4 between the two best logits is 10 nats at T = 1e-5).
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # how many top alternatives to return per token (0: just the chosen one)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            problems.append("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Status(enum.Enum):
    WAITING = "waiting"  # not yet (or no longer, after preemption) holding cache blocks
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.draft_token_ids: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None  # "stop" or "length" once finished, "abort" if cancelled, "error"
        self.error: str | None = None  # why it failed, when finish_reason is "error"

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return -(-len(self.token_ids) // block_size)

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.value}, tokens={len(self)}, "
                f"cached={self.num_cached_tokens}, blocks={self.block_table})")
