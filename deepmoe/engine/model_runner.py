"""Executes a scheduler plan on the model: the only part of the engine that touches device memory.

Short rows (decodes, a decode plus its draft tokens) run together as one padded batch with per-row
positions; prefill chunks of similar length share a forward pass, with padding kept under a quarter of
the tokens. Attention always runs in absorbed form over the paged latent cache. The runner returns hidden
states; the engine picks which positions need logits (one per sampling sequence, more when drafts are
verified). With MTP drafting, the MTP layer runs over the same positions once their next token is known.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..model import DeepSeekModel
from ..model.experts import Experts
from .decode_step import StaticDecoder
from .kv_cache import PagedBatch, PagedLatentCache
from .scheduler import Scheduled
from .sequence import Sequence

SHORT_ROW = 4  # rows of at most this many tokens (decodes, drafts) always share one padded forward
MAX_PADDING = 0.25  # longer rows (prefill chunks) share a forward while padding stays under this fraction


def batch_rows(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped into padded forward passes: all short rows together; prefill chunks sorted by
    length, each joining the current group while padding to its length wastes at most MAX_PADDING of
    the group's tokens (many similar prompts arriving together prefill in one pass)."""
    short = [i for i, n in enumerate(lengths) if n <= SHORT_ROW]
    groups, group, tokens = [short] if short else [], [], 0
    for i in sorted((i for i, n in enumerate(lengths) if n > SHORT_ROW), key=lengths.__getitem__):
        if group and (len(group) + 1) * lengths[i] > (1 + MAX_PADDING) * (tokens + lengths[i]):
            groups.append(group)
            group, tokens = [], 0
        group.append(i)
        tokens += lengths[i]
    return groups + ([group] if group else [])


@torch.inference_mode()
def activation_peak(model: DeepSeekModel, num_tokens: int, block_size: int, layers: int) -> int:
    """CUDA bytes a forward of the largest step allocates beyond what is resident: one prefill chunk of
    num_tokens through a scratch cache just big enough (its size counted in, as a safety margin)."""
    device = model.lm_head.weight.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    blocks = -(-num_tokens // block_size)
    cache = PagedLatentCache(model.config, blocks, block_size, model.lm_head.weight.dtype, device, layers)
    batch = cache.batch([list(range(blocks))], [0], [num_tokens])
    hidden = model.hidden_states(torch.zeros(1, num_tokens, dtype=torch.long, device=device), cache=batch,
                                 start_pos=torch.zeros(1, dtype=torch.long, device=device))
    model.lm_head(hidden[:, -1]).float()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del cache, batch, hidden
    torch.cuda.empty_cache()
    return peak


def cpu_decode_layout(model: DeepSeekModel) -> None:
    """Store each projection's weight (out, in) as the transpose of a contiguous (in, out) matrix: the
    same values and shape, other strides. At decode sizes torch's CPU kernels then run x·Wᵀ as a
    row-major GEMV that streams the weights ~2.5x faster (measured on this project's 2-core CI machine:
    19 vs 7.4 GB/s on a 64 MiB matrix). kv_b_proj is left alone (absorbed attention views it per head),
    and so is a head tied to the embedding (row lookups want rows contiguous), and so is a weight that is a
    tensor subclass (torchao's quantised weights: their own packed layout, and no transpose to re-lay out)."""
    tied = model.model.embed_tokens.weight
    with torch.no_grad():
        for name, module in model.named_modules():
            if (isinstance(module, nn.Linear) and module.weight is not tied and not name.endswith("kv_b_proj")
                    and type(module.weight.data) is torch.Tensor):
                module.weight.data = module.weight.data.t().contiguous().t()
            elif isinstance(module, Experts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)


class ModelRunner:
    """decode_mode: how steps made only of decodes (one pending token each, plus its drafts) run, and the
    MTP drafting that follows them. None: the general padded path (CPU's fastest); "graphs", "compiled",
    "static": the static-shape steps of decode_step.py, replayed as CUDA graphs, compiled whole, or eager.
    max_num_seqs and max_model_len size their buffers."""

    def __init__(self, model: DeepSeekModel, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                 draft_layers: int = 0, decode_mode: str | None = None, max_num_seqs: int = 64,
                 max_model_len: int | None = None):
        self.model = model.eval()
        p = model.lm_head.weight
        self.device = p.device
        if self.device.type == "cpu":
            cpu_decode_layout(model)
        layers = model.config.num_hidden_layers + draft_layers
        self.cache = PagedLatentCache(model.config, num_blocks, block_size, dtype or p.dtype, p.device, layers)
        self.decoder = None
        if decode_mode is not None:
            max_len = max_model_len or model.config.max_position_embeddings
            max_blocks = min(num_blocks, -(-max_len // block_size))
            self.decoder = StaticDecoder(model, self.cache, max_num_seqs, max_blocks, decode_mode,
                                         draft_tokens=draft_layers)
        self.static_rows: list[int] | None = None  # the sequences of the last static step, in row order

    @torch.inference_mode()
    def run(self, plan: list[Scheduled]) -> dict[int, torch.Tensor]:
        """seq_id → final normed hidden states (num_tokens, d) of the tokens computed for it this step
        (its pending tokens, then its draft tokens)."""
        seqs = [item.seq for item in plan]
        self.static_rows = None
        if (self.decoder is not None and all(item.num_tokens - item.num_draft == 1 for item in plan)
                and self.decoder.fits(len(plan), [item.num_tokens for item in plan])):
            tokens = [s.token_ids[s.num_cached_tokens:s.num_cached_tokens + 1] + s.draft_token_ids[:item.num_draft]
                      for s, item in zip(seqs, plan)]
            hidden = self.decoder.run(tokens, [s.num_cached_tokens for s in seqs], [s.block_table for s in seqs])
            self.static_rows = [s.seq_id for s in seqs]
            return {s.seq_id: hidden[i, :item.num_tokens] for i, (s, item) in enumerate(zip(seqs, plan))}
        tokens = []
        for item in plan:
            s, n = item.seq, item.num_tokens - item.num_draft
            tokens.append(s.token_ids[s.num_cached_tokens:s.num_cached_tokens + n] + s.draft_token_ids[:item.num_draft])

        def forward(ids, batch, starts, rows):
            return self.model.hidden_states(ids, cache=batch, start_pos=starts)

        hidden = self._run(seqs, [s.num_cached_tokens for s in seqs], tokens, forward)
        return {s.seq_id: h for s, h in zip(seqs, hidden)}

    @torch.inference_mode()
    def draft(self, seqs: list[Sequence], starts: list[int], next_ids: list[list[int]],
              hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """MTP depth 1 over positions starts[b] .. of each sequence, given the main model's hidden states
        there (n, d) and the token after each position → MTP hidden states (n, d); writes the MTP cache.
        After a static step over the same sequences, the static drafting step reads that step's output."""
        if self.static_rows is not None and self.static_rows == [s.seq_id for s in seqs]:
            self.static_rows = None
            out = self.decoder.draft(next_ids, starts, [s.block_table for s in seqs])
            return [out[i, :len(ids)] for i, ids in enumerate(next_ids)]
        def forward(ids, batch, start, rows):
            h = torch.zeros(*ids.shape, hidden[0].shape[-1], dtype=hidden[0].dtype, device=self.device)
            for j, i in enumerate(rows):
                h[j, :len(hidden[i])] = hidden[i]
            return self.model.mtp_hidden(1, h, ids, cache=batch, start_pos=start)

        return self._run(seqs, starts, next_ids, forward)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    @torch.inference_mode()
    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.mtp_head(1, hidden).float()

    def _run(self, seqs: list[Sequence], starts: list[int], tokens: list[list[int]],
             forward: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """Row b computes tokens[b] at positions starts[b] ..; forward(ids (b, T), PagedBatch, starts (b,),
        row indices) → (b, T, d). Returns each row's (len(tokens[b]), d) unpadded."""
        out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
        for rows in batch_rows([len(t) for t in tokens]):
            T = max(len(tokens[i]) for i in rows)
            ids = torch.tensor([tokens[i] + [0] * (T - len(tokens[i])) for i in rows], device=self.device)
            batch: PagedBatch = self.cache.batch([seqs[i].block_table for i in rows], [starts[i] for i in rows],
                                                 [len(tokens[i]) for i in rows])
            start = torch.tensor([starts[i] for i in rows], device=self.device)
            h = forward(ids, batch, start, rows)
            for j, i in enumerate(rows):
                out[i] = h[j, :len(tokens[i])]
        return out
