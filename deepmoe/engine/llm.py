"""The offline API: `LLM(model_dir).generate(prompts, SamplingParams(...))`, or `.stream(prompt, ...)` for the
text as it is made.

`LLMEngine.step()` is the whole engine loop: schedule → run the model → sample (or verify drafts) →
draft the next tokens with the MTP layer (when speculative) → postprocess (stop rules, detokenize, stop
strings). The cache is sized from a memory budget; everything is exact: greedy output equals a plain
full-recompute greedy loop token for token, with or without speculation, and a seeded request samples the
same tokens whatever it is batched with, however often it is preempted, with or without speculation
(tested).

A failure that belongs to one sequence (drawing, verifying or drafting its tokens with its own parameters,
detokenising it for its stop strings) finishes only that sequence, with finish_reason "error" and the reason
in `seq.error`; the rest of the batch goes on as if it had not been there. A failure of the whole batch (the
model's forward) still propagates: the engine's state is then unknown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..checkpoint import load_pretrained
from ..tokenizer import Tokenizer, load_tokenizer
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, decode_stable, first_stop, streamable
from .kv_cache import budget_bytes, bytes_per_block
from .model_runner import ModelRunner, activation_peak
from .sampler import sample, token_generator
from .scheduler import Scheduled, Scheduler
from .sequence import SamplingParams, Sequence
from .speculative import propose, verify

log = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None  # per token: chosen and top alternatives → log-prob


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    # the common n = 1 case reads like vLLM's outputs[0]
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class LLMEngine:
    """kv_cache_bytes: the paged cache's size; None sizes it from the device: on CUDA, memory_fraction of
    the GPU minus what is resident and the measured activation peak of the largest step; on CPU 256 MiB.
    On CPU the engine re-lays out the model's projection weights for fast decoding (same values and
    shapes; see model_runner.cpu_decode_layout). On CUDA decode steps replay CUDA graphs unless
    cuda_graphs=False; decode_mode overrides the choice ("graphs", "compiled", "static"; see decode_step)."""

    def __init__(self, model, tokenizer: Tokenizer, kv_cache_bytes: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, speculative: bool = False,
                 memory_fraction: float = 0.9, cuda_graphs: bool = True, decode_mode: str | None = None):
        cfg = model.config
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding drafts with the model's MTP layers, and this model has none "
                             "(num_nextn_predict_layers is 0 or the checkpoint holds no MTP weights)")
        dtype = model.lm_head.weight.dtype
        layers = cfg.num_hidden_layers + (1 if speculative else 0)  # drafting caches MTP depth 1 as well
        per_block = bytes_per_block(cfg, block_size, dtype, layers)
        if kv_cache_bytes is None:
            kv_cache_bytes = self._default_cache_bytes(model, max_num_batched_tokens, block_size, layers,
                                                       memory_fraction)
        num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} is below one block ({per_block} bytes)")
        self.tokenizer = tokenizer
        self.speculative = speculative
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, cfg.max_position_embeddings)
        if decode_mode is None and cuda_graphs and model.lm_head.weight.device.type == "cuda":
            decode_mode = "graphs"  # decode steps replay CUDA graphs; elsewhere the general path is fastest
        self.runner = ModelRunner(model, num_blocks, block_size, dtype, draft_layers=layers - cfg.num_hidden_layers,
                                  decode_mode=decode_mode, max_num_seqs=max_num_seqs,
                                  max_model_len=cfg.max_position_embeddings)
        self.seeds: dict[int, int] = {}  # seq_id → the seed its tokens' generators derive from
        self.logprobs: dict[int, list[dict[int, float]]] = {}
        self.texts: dict[int, IncrementalDetokenizer] = {}
        self.num_drafted = self.num_accepted = 0  # speculative decoding's acceptance statistics

    @staticmethod
    def _default_cache_bytes(model, max_num_batched_tokens: int, block_size: int, layers: int,
                             memory_fraction: float) -> int:
        device = model.lm_head.weight.device
        if device.type != "cuda":
            return 256 * 2**20
        peak = activation_peak(model, max_num_batched_tokens, block_size, layers)
        free, total = torch.cuda.mem_get_info(device)
        return budget_bytes(total, total - free, peak, memory_fraction)

    @property
    def vocab_size(self) -> int:
        return self.runner.model.config.vocab_size

    def token_logprobs(self, seq: Sequence) -> list[dict[int, float]]:
        """The logprobs recorded so far for seq (when its request asked for them), one dict per token."""
        return self.logprobs.get(seq.seq_id, [])

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str, index: int = 0) -> Sequence:
        limit = self.scheduler.max_model_len
        if limit is not None and len(prompt_ids) >= limit:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:  # an embedding lookup out of range would fail the whole batch's step, not just this request
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        seq = Sequence(prompt_ids, params, request_id)
        # unseeded requests get a seed too: drafts and their verification must draw with the same noise
        self.seeds[seq.seq_id] = params.seed + index if params.seed is not None else int(torch.randint(2**62, ()))
        self.logprobs[seq.seq_id] = []
        self.texts[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add(seq)
        return seq

    def step(self) -> list[Sequence]:
        """One engine iteration; returns the sequences that finished in it (those that failed alone too)."""
        plan = self.scheduler.schedule()
        hidden = self.runner.run(plan)
        failed: dict[int, Sequence] = {}
        sampling = [item for item in plan if item.samples]
        new_tokens: dict[int, list[int]] = {}
        if sampling:  # logits only where a token is chosen: the last pending token and each draft
            rows = [hidden[item.seq.seq_id][-1 - item.num_draft:] for item in sampling]
            logits = self.runner.logits(torch.cat(rows)).split([len(r) for r in rows])
            plain = [(item.seq, lg[0]) for item, lg in zip(sampling, logits) if not item.num_draft]
            if plain:
                new_tokens.update(self._sample(plain, failed))
            for item, lg in zip(sampling, logits):
                if item.num_draft:
                    with self._alone(item.seq, failed):
                        new_tokens[item.seq.seq_id] = self._verify(item, lg)
        plan = [item for item in plan if item.seq.seq_id not in failed]  # a failed sequence drafts nothing
        drafts = self._draft(plan, hidden, new_tokens, failed) if self.speculative else {}
        plan = [item for item in plan if item.seq.seq_id not in failed]
        finished = self.scheduler.postprocess(plan, new_tokens, self.tokenizer.eos_id)
        for item in plan:  # stop strings: end the sequence and cut the text at the first match
            s = item.seq
            if item.samples and not s.is_finished and s.params.stop:
                with self._alone(s, failed):
                    if first_stop(self.text(s), s.params.stop) is not None:
                        self.scheduler.finish(s, "stop")
                        finished.append(s)
        for seq, token in drafts.values():
            if not seq.is_finished and seq.num_cached_tokens == len(seq) - 1:  # still decoding, not preempted
                seq.draft_token_ids = [token]
        for seq in failed.values():
            self.scheduler.finish(seq, "error")
            finished.append(seq)
        return finished

    @contextmanager
    def _alone(self, seq: Sequence, failed: dict[int, Sequence]) -> Iterator[None]:
        """Run a piece of work that concerns seq alone: an exception in it fails seq, not the step."""
        try:
            yield
        except Exception as e:
            log.exception("sequence %d (request %s) failed; ending it alone", seq.seq_id, seq.request_id)
            seq.error = f"{type(e).__name__}: {e}"
            failed[seq.seq_id] = seq

    def _sample(self, rows: list[tuple[Sequence, torch.Tensor]], failed: dict[int, Sequence]
                ) -> dict[int, list[int]]:
        """The new token of each sequence without drafts, from its logits (V,), in one batched call (a single
        device→host copy). When the batch fails, each row is drawn alone, so only a row that fails by itself
        loses its sequence: rows are independent (each draws with its own position's generator), so the
        tokens are the same either way."""
        def draw(part: list[tuple[Sequence, torch.Tensor]]) -> list[tuple[Sequence, int, torch.Tensor]]:
            seqs = [s for s, _ in part]
            tokens, logps = sample(torch.stack([lg for _, lg in part]), [s.params for s in seqs],
                                   [s.token_ids for s in seqs], [s.num_prompt_tokens for s in seqs],
                                   [self._generator(s, len(s)) for s in seqs])
            return list(zip(seqs, tokens, logps))

        try:
            drawn = draw(rows)
        except Exception:
            drawn = []
            for row in rows:
                with self._alone(row[0], failed):
                    drawn += draw([row])
        out = {}
        for s, tok, lp in drawn:
            with self._alone(s, failed):
                out[s.seq_id] = self._record(s, [tok], [lp])
        return out

    def _generator(self, seq: Sequence, position: int) -> torch.Generator | None:
        """The generator for seq's token at `position` (None when greedy: nothing is drawn)."""
        if seq.params.greedy:
            return None
        return token_generator(self.seeds[seq.seq_id], position, self.runner.device)

    def _verify(self, item: Scheduled, logits: torch.Tensor) -> list[int]:
        """New tokens of a sequence with drafts, from the target logits (1 + num_draft, V)."""
        s = item.seq
        tokens, logps = verify(logits, s.params, s.token_ids, s.num_prompt_tokens, s.draft_token_ids,
                               [self._generator(s, len(s) + j) for j in range(item.num_draft + 1)])
        self.num_drafted += item.num_draft
        self.num_accepted += len(tokens) - 1
        return self._record(s, tokens, logps)

    def _record(self, seq: Sequence, tokens: list[int], logps) -> list[int]:
        """Keep the logprobs of seq's new tokens (chosen and top alternatives) when its request wants them."""
        k = seq.params.logprobs
        if k is not None:
            for tok, lp in zip(tokens, logps):
                top = lp.topk(k).indices.tolist() if k else []
                self.logprobs[seq.seq_id].append({t: float(lp[t]) for t in [tok, *top]})
        return tokens

    def _draft(self, plan: list[Scheduled], hidden: dict[int, torch.Tensor], new_tokens: dict[int, list[int]],
               failed: dict[int, Sequence]) -> dict[int, tuple[Sequence, int]]:
        """Run MTP depth 1 over every position that became final this step (its next token is now known),
        keeping the MTP cache complete, and propose one draft token for each sequence that sampled."""
        seqs, starts, next_ids, h = [], [], [], []
        for item in plan:
            s, new = item.seq, new_tokens.get(item.seq.seq_id, [])
            kept = item.num_kept(len(new)) if item.samples else item.num_tokens
            full = s.token_ids + new
            seqs.append(s)
            starts.append(s.num_cached_tokens)
            next_ids.append(full[s.num_cached_tokens + 1:s.num_cached_tokens + kept + 1])
            h.append(hidden[s.seq_id][:kept])
        mtp_hidden = self.runner.draft(seqs, starts, next_ids, h)
        out = {}
        sampling = [(item.seq, mh[-1]) for item, mh in zip(plan, mtp_hidden) if item.samples]
        if sampling:
            logits = self.runner.draft_logits(torch.stack([mh for _, mh in sampling]))
            for (s, _), lg in zip(sampling, logits):
                with self._alone(s, failed):
                    history = s.token_ids + new_tokens[s.seq_id]
                    token = propose(lg, s.params, history, s.num_prompt_tokens, self._generator(s, len(history)))
                    out[s.seq_id] = (s, token)
        return out

    def text(self, seq: Sequence) -> str:
        """The completion's text so far, never ending inside a character; decodes only the new tokens."""
        return self.texts[seq.seq_id].update(seq.completion_token_ids)

    def abort(self, seq: Sequence) -> None:
        """Cancel a request (a client went away): its blocks go back to the pool at once."""
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")
        self._forget(seq)

    def output(self, seq: Sequence, index: int) -> CompletionOutput:
        """The finished sequence's result: eos stripped, the text cut at the first stop string (a sequence that
        failed has finish_reason "error" and the reason in seq.error)."""
        ids = seq.completion_token_ids
        if ids and seq.finish_reason == "stop" and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]  # eos is how it stopped, not part of the text
        text = decode_stable(self.tokenizer, ids)
        cut = first_stop(text, seq.params.stop)
        if cut is not None:
            text = text[:cut]
        lp = self.logprobs.get(seq.seq_id) if seq.params.logprobs is not None else None
        self._forget(seq)
        return CompletionOutput(index, text, ids, seq.finish_reason, lp)

    def _forget(self, seq: Sequence) -> None:
        for per_seq in (self.seeds, self.logprobs, self.texts):
            per_seq.pop(seq.seq_id, None)


class LLM:
    """adapter: a LoRA adapter directory (peft layout) to serve on top of model_dir; it is merged into the
    weights at load (see deepmoe.lora), so decoding runs every fast path at the base model's speed."""

    def __init__(self, model_dir: str | os.PathLike, device: str | None = None, dtype: torch.dtype | None = None,
                 kv_cache_bytes: int | None = None, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, speculative: bool = False, memory_fraction: float = 0.9,
                 cuda_graphs: bool = True, adapter: str | os.PathLike | None = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_pretrained(model_dir, device=device, dtype=dtype, load_mtp=speculative)
        if adapter is not None:
            from ..lora import load_adapter, merge_lora

            load_adapter(model, adapter)
            merge_lora(model)
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = LLMEngine(model, self.tokenizer, kv_cache_bytes, block_size, max_num_seqs,
                                max_num_batched_tokens, speculative, memory_fraction, cuda_graphs)

    def generate(self, prompts, params: SamplingParams | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. Results come back in prompt order."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        requests, seqs = [], []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            req = RequestOutput(str(i), ids)
            requests.append(req)
            seqs.append([(k, self.engine.add(ids, params, req.request_id, k)) for k in range(params.n)])
        while self.engine.scheduler.has_unfinished():
            self.engine.step()
        for req, group in zip(requests, seqs):
            req.outputs = [self.engine.output(seq, k) for k, seq in group]
        failed = [f"prompt {i} (sample {k}): {seq.error}" for i, group in enumerate(seqs) for k, seq in group
                  if seq.finish_reason == "error"]
        if failed:  # an output with a silent gap is worse than none: name what failed
            raise RuntimeError("generation failed for " + "; ".join(failed))
        return requests

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """One completion of one prompt as pieces of text, each yielded as soon as the engine has made it
        final (never half a character, never text a stop string may still cut). The pieces join to the
        `text` that `generate` returns for the same prompt and parameters. Stopping the iteration early
        (break, Ctrl-C) cancels the request and frees its cache blocks."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream makes one completion; n must be 1, got {params.n}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        seq = self.engine.add(ids, params, "stream")
        sent = ""
        try:
            while not seq.is_finished:
                self.engine.step()
                if not seq.is_finished:
                    text = streamable(self.engine.text(seq), seq.params.stop)
                    if len(text) > len(sent):
                        piece, sent = text[len(sent):], text
                        yield piece
            if seq.finish_reason == "error":
                raise RuntimeError(f"generation failed: {seq.error}")
            rest = self.engine.output(seq, 0).text[len(sent):]  # sent is a prefix: nothing shown is taken back
            if rest:
                yield rest
        finally:
            if not seq.is_finished:
                self.engine.abort(seq)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The token ids of messages rendered with the tokenizer's chat template, ready for the reply."""
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate(self.chat_prompt(messages), params)[0]
