"""What one client may ask of the server, and how long the server waits for it: the bounds that keep one
request from hurting the others. `deepmoe serve` has a flag for each field, of the same name and default
(`--max-body-bytes`, `--max-prompts-per-request`, ...); docs/inference.md lists them."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20  # a bigger request body gets 413
    # each prompt is a prefill of its own (the n samples of one prompt share its prefix in the cache): more is a 400
    max_prompts_per_request: int = 64
    max_seqs_per_request: int = 256  # prompts × n, the sequences one request queues: more is a 400
    # sequences admitted but not yet running; a request that would take the queue past this gets 503 + Retry-After
    max_waiting_seqs: int = 1024
    read_timeout_s: float = 30.0  # the whole body must arrive within this once the headers have: else 408
    # after SIGTERM/SIGINT, requests still running this long are ended: a 503, or an error event and [DONE]
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        problems = [f"{f.name} must be > 0, got {getattr(self, f.name)}" for f in fields(self)
                    if f.name != "shutdown_grace_s" and not getattr(self, f.name) > 0]
        if not self.shutdown_grace_s >= 0:
            problems.append(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.max_seqs_per_request > self.max_waiting_seqs:  # such a request could never be queued
            problems.append(f"max_seqs_per_request ({self.max_seqs_per_request}) must be <= max_waiting_seqs "
                            f"({self.max_waiting_seqs})")
        if problems:
            raise ValueError("invalid server limits: " + "; ".join(problems))
