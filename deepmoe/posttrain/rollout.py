"""Rollouts for on-policy training: deepmoe's inference engine, in the training process, on the weights
being trained.

The engine runs a second copy of the policy, made once at the start, in the serving dtype (bf16 on CUDA,
fp32 on CPU) and layout (the CPU decode layout, CUDA graphs on a GPU). After every optimizer step `sync`
copies the trained weights into it in place (`copy_` keeps the copy's storage, strides and dtype, so
captured CUDA graphs stay valid) and forgets the prefix cache, whose latents the old weights computed.
This costs one weight copy per step and one extra copy of the weights in memory (half of it on CUDA),
and in exchange decoding keeps every fast path of the engine while training keeps fp32 master weights,
train-mode modules and its own memory layout. Nothing is written to disk or reloaded between steps.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import torch

from ..engine.llm import LLMEngine
from ..engine.sequence import SamplingParams
from ..model import DeepSeekModel
from ..tokenizer import Tokenizer


@dataclass
class Rollout:
    prompt_ids: list[int]
    token_ids: list[int]  # the completion as sampled, eos included when it ended there
    text: str  # eos stripped, as a client would see it
    finish_reason: str  # "stop" (eos or a stop string) or "length" (truncated at max_tokens)
    logprobs: list[float] | None  # the engine's log-probabilities of the sampled tokens (temperature 1)


class RolloutEngine:
    def __init__(self, policy: DeepSeekModel, tokenizer: Tokenizer, dtype: torch.dtype, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 4096, kv_cache_bytes: int | None = None):
        # a deep copy before any training transform (activation checkpointing, compile) is applied to policy
        model = copy.deepcopy(policy).to(dtype).requires_grad_(False)
        self.engine = LLMEngine(model, tokenizer, kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens)
        self.model = model
        self.tokenizer = tokenizer
        self.syncs = 0

    @torch.no_grad()
    def sync(self, policy: DeepSeekModel) -> float:
        """Copy policy's current weights (parameters and buffers, the balancing bias included) into the
        engine's copy; returns the seconds it took. Names must match one to one: the policy is a plain model
        (adapters are merged by the caller before, if any)."""
        t0 = time.perf_counter()
        src = dict(policy.named_parameters()) | dict(policy.named_buffers())
        dst = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        if src.keys() != dst.keys():
            missing, extra = sorted(dst.keys() - src.keys()), sorted(src.keys() - dst.keys())
            raise RuntimeError(f"the policy and its rollout copy differ: missing {missing[:3]}, extra {extra[:3]}")
        for name, t in dst.items():
            t.copy_(src[name])
        # every cached prefix was computed with the old weights; blocks in use hold none (no request is running)
        if self.engine.scheduler.has_unfinished():
            raise RuntimeError("weights cannot change while the engine holds unfinished requests")
        self.engine.blocks.reset_prefix_cache()
        self.syncs += 1
        return time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seeds: list[int],
                 want_logprobs: bool = False) -> list[list[Rollout]]:
        """n completions of each prompt, prompt i's k-th drawn with seed seeds[i] + k (the engine's per-position
        noise: the same tokens whatever the batch, so a resumed run draws the same rollouts). All prompts
        run as one batch, and the n copies of a prompt share its cached prefix."""
        engine = self.engine
        groups = []
        for i, ids in enumerate(prompts):
            p = replace(params, seed=seeds[i], n=1, logprobs=0 if want_logprobs else None)
            groups.append([engine.add(list(ids), p, f"rollout-{i}", k) for k in range(n)])
        while engine.scheduler.has_unfinished():
            engine.step()
        out = []
        for i, group in enumerate(groups):
            rows = []
            for k, seq in enumerate(group):
                if seq.finish_reason == "error":
                    raise RuntimeError(f"rollout {k} of prompt {i} failed in the engine: {seq.error}")
                token_ids = list(seq.completion_token_ids)
                lps = engine.token_logprobs(seq) if want_logprobs else None
                logprobs = [d[t] for d, t in zip(lps, token_ids)] if lps is not None else None
                o = engine.output(seq, k)
                reason = "length" if seq.finish_reason == "length" else "stop"
                rows.append(Rollout(list(prompts[i]), token_ids, o.text, reason, logprobs))
            out.append(rows)
        return out
