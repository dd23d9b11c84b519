"""Executes a scheduler plan on the model: the only part of the engine that touches device memory.

Decoding sequences (one new token each) run together as one batch with per-row positions; every prefill
chunk runs as its own forward pass, so no prompt is padded to another's length. Attention always runs in
absorbed form over the paged latent cache. Returns the last-position logits of every sequence whose
pending tokens are now all computed (the ones that sample).
"""

from __future__ import annotations

import torch

from ..model import DeepSeekModel
from .kv_cache import PagedBatch, PagedLatentCache
from .scheduler import Scheduled


class ModelRunner:
    def __init__(self, model: DeepSeekModel, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        self.model = model.eval()
        p = model.lm_head.weight
        self.device = p.device
        self.cache = PagedLatentCache(model.config, num_blocks, block_size, dtype or p.dtype, p.device)

    @torch.inference_mode()
    def run(self, plan: list[Scheduled]) -> dict[int, torch.Tensor]:
        """seq_id → logits (V,) for the sequences that sample this step."""
        out: dict[int, torch.Tensor] = {}
        decodes = [item for item in plan if item.num_tokens == 1]
        for item in plan:
            if item.num_tokens > 1:
                logits = self._forward([item])
                if item.samples:
                    out[item.seq.seq_id] = logits[0]
        if decodes:
            logits = self._forward(decodes)
            for item, row in zip(decodes, logits):
                if item.samples:
                    out[item.seq.seq_id] = row
        return out

    def _long(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _forward(self, items: list[Scheduled]) -> torch.Tensor:
        """Rows of equal length T (a batch of decodes, or one prefill chunk) → last-position logits (B, V)."""
        T = items[0].num_tokens
        starts = [item.seq.num_cached_tokens for item in items]
        ids = [item.seq.token_ids[s:s + T] for item, s in zip(items, starts)]
        S = max(starts) + T
        write, read = [], []
        for item, s in zip(items, starts):
            table = item.seq.block_table
            write.append(self.cache.slots(table, s, s + T))
            history = self.cache.slots(table, 0, s + T)
            read.append(history + [history[0]] * (S - len(history)))  # padding: masked by position
        batch = PagedBatch(self.cache, self._long(write), self._long(read))
        hidden = self.model.hidden_states(self._long(ids), cache=batch, start_pos=self._long(starts))
        return self.model.lm_head(hidden[:, -1]).float()
