"""The paged MLA latent cache: device memory for every block the BlockManager hands out.

Per layer and token slot only MLA's latent is stored: c_kv (kv_lora_rank) and the rotated k_pe
(qk_rope_head_dim), 576 values per token per layer at DeepSeek-V3 size, instead of per-head keys and
values. The MTP layers get cache layers after the main stack. Slot s of block b is row b·block_size + s;
one extra row at the end is scratch that padding writes into and reads from. A `PagedBatch` is the view
one forward pass gets: it writes the new tokens' latents into their slots and gathers each row's whole
history (padded to the longest row; the attention mask hides the padding by position).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, layers: int | None = None) -> int:
    """Cache bytes of one block; layers defaults to the main stack (add the MTP layers when drafting)."""
    layers = cfg.num_hidden_layers if layers is None else layers
    return layers * block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize


def budget_bytes(total: int, in_use: int, activation_peak: int, memory_fraction: float) -> int:
    """Cache bytes for a device of `total` bytes: memory_fraction of it, minus what is in use already
    (weights, other processes) and the activation peak of the largest step the scheduler can plan."""
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    budget = int(total * memory_fraction) - in_use - activation_peak
    if budget <= 0:
        gib = 2**30
        raise ValueError(f"no memory left for the KV cache: {memory_fraction:.0%} of {total / gib:.1f} GiB, minus "
                         f"{in_use / gib:.1f} GiB in use and a {activation_peak / gib:.1f} GiB activation peak; "
                         "raise memory_fraction, lower max_num_batched_tokens, or use a smaller dtype")
    return budget


class PagedLatentCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device,
                 layers: int | None = None):
        layers = cfg.num_hidden_layers if layers is None else layers
        self.block_size = block_size
        self.scratch = num_blocks * block_size  # the padding slot
        self.c_kv = torch.zeros(layers, self.scratch + 1, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(layers, self.scratch + 1, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def batch(self, block_tables: list[list[int]], starts: list[int], lengths: list[int]) -> PagedBatch:
        """The view for rows that compute `lengths[b]` tokens from position `starts[b]`, each row's tokens
        at positions 0 .. starts[b] + lengths[b] - 1 living in the blocks of block_tables[b]."""
        device, bs = self.c_kv.device, self.block_size
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
        start = torch.tensor(starts, dtype=torch.long)
        end = start + torch.tensor(lengths, dtype=torch.long)
        T, S = max(lengths), int(end.max())

        def slots(pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # (B, n) positions → cache rows
            rows = tables.gather(1, (pos // bs).clamp(max=width - 1)) * bs + pos % bs
            return torch.where(valid, rows, self.scratch)

        new = start[:, None] + torch.arange(T)
        every = torch.arange(S).expand(len(starts), S)
        write = slots(new, new < end[:, None])
        read = slots(every, every < end[:, None])
        return PagedBatch(self, write.to(device), read.to(device))


class PagedBatch:
    """One forward pass's view of the cache (the model's LatentCache protocol): `write` (B, T) holds the
    slots of the new tokens, `read` (B, S) the slots of positions 0 .. S-1, the scratch slot as padding."""

    def __init__(self, cache: PagedLatentCache, write: torch.Tensor, read: torch.Tensor):
        self.cache, self.write, self.read = cache, write, read

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos):
        c, k = self.cache.c_kv[layer_idx], self.cache.k_pe[layer_idx]
        slots = self.write.reshape(-1)
        c.index_copy_(0, slots, c_kv.reshape(-1, c.shape[-1]).to(c.dtype))
        k.index_copy_(0, slots, k_pe.reshape(-1, k.shape[-1]).to(k.dtype))
        return c[self.read], k[self.read]  # (B, S, ·)
