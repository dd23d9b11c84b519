"""The paged MLA latent cache: device memory for every block the BlockManager hands out.

Per layer and token slot only MLA's latent is stored: c_kv (kv_lora_rank) and the rotated k_pe
(qk_rope_head_dim), 576 values per token per layer at DeepSeek-V3 size, instead of per-head keys and
values. Slot s of block b is row b·block_size + s. A `PagedBatch` is the view one forward pass gets: it
writes the new tokens' latents into their slots and gathers each row's whole history (padded to the
longest row; the attention mask hides the padding by position).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.num_hidden_layers * block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize


class PagedLatentCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        slots = num_blocks * block_size
        self.block_size = block_size
        self.c_kv = torch.zeros(cfg.num_hidden_layers, slots, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(cfg.num_hidden_layers, slots, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache rows of token positions start .. end-1 of a sequence with this block table."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]


class PagedBatch:
    """One forward pass's view of the cache (the model's LatentCache protocol). Row b computes tokens at
    positions start[b] .. start[b] + n[b] - 1; `write` (B, T) holds their slots (-1 for padding);
    `read` (B, S) the slots of each row's positions 0 .. S-1 (any valid slot as padding)."""

    def __init__(self, cache: PagedLatentCache, write: torch.Tensor, read: torch.Tensor):
        self.cache, self.write, self.read = cache, write, read
        self.valid = write >= 0

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos):
        slots = self.write[self.valid]
        self.cache.c_kv[layer_idx, slots] = c_kv[self.valid].to(self.cache.c_kv.dtype)
        self.cache.k_pe[layer_idx, slots] = k_pe[self.valid].to(self.cache.k_pe.dtype)
        return self.cache.c_kv[layer_idx][self.read], self.cache.k_pe[layer_idx][self.read]  # (B, S, ·)
