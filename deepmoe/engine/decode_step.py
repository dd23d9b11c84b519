"""The decode step with static shapes: what a CUDA graph replays and `torch.compile(fullgraph=True)` proves.

A decode batch (every sequence computing exactly one new token) runs from fixed buffers sized for its
batch-size bucket: one int64 row per sequence, `[token, position, block table ...]`, padded to the widest
block table a sequence can have (max context / block size). Padding rows carry position -1: they write
their latent into the cache's scratch slot and their outputs are dropped. Inside the step nothing reads
a value back to the host and no shape depends on data: cache slots are computed on the device from the
block table, attention reads the latent through the table with a position mask, the routed experts use
their sync-free formulation. The host copies one small pinned tensor in and reads the sampled ids out.

Modes: "graphs" captures one CUDA graph per bucket (after a warm-up, all sharing one memory pool) and
replays it; "compiled" runs the step through `torch.compile(fullgraph=True, dynamic=False)`, which fails
on any graph break and so proves on a CPU that the step is capturable; "static" runs it eagerly (for
comparison). Prefill chunks and MTP drafting keep the general path of the model runner.
"""

from __future__ import annotations

import torch

from ..model import DeepSeekModel
from .kv_cache import PagedLatentCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODES = ("static", "compiled", "graphs")


def buckets_up_to(max_num_seqs: int) -> list[int]:
    """The bucket sizes a scheduler allowing max_num_seqs decodes per step needs (the last covers it)."""
    out = [b for b in BUCKETS if b < max_num_seqs]
    return out + [max_num_seqs]


class DecodeBatch:
    """The model's LatentCache view for a static decode step: slots computed on the device.
    tables (B, W) block ids, positions (B,) of the new token (-1 for a padding row). With `kernel`, attention
    reads the cache's blocks in place (kernels/paged_mla_decode.py); otherwise every row's W·block_size
    positions are gathered and masked by position (the torch path, and the reference)."""

    def __init__(self, cache: PagedLatentCache, tables: torch.Tensor, positions: torch.Tensor, kernel: bool = False):
        bs = cache.block_size
        self.cache, self.tables, self.positions, self.kernel = cache, tables, positions, kernel
        slot = tables.gather(1, (positions.clamp(min=0) // bs)[:, None]) * bs + (positions % bs)[:, None]
        self.write = torch.where(positions[:, None] >= 0, slot, cache.scratch)  # (B, 1)
        if not kernel:
            every = torch.arange(tables.shape[1] * bs, device=tables.device)  # positions 0 .. W·bs - 1
            self.read = tables[:, every // bs] * bs + every % bs  # (B, S); the mask hides a row's tail

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos):
        c, k = self.cache.c_kv[layer_idx], self.cache.k_pe[layer_idx]
        slots = self.write.reshape(-1)
        c.index_copy_(0, slots, c_kv.reshape(-1, c.shape[-1]).to(c.dtype))
        k.index_copy_(0, slots, k_pe.reshape(-1, k.shape[-1]).to(k.dtype))
        if self.kernel:
            return None  # `attend` reads the blocks in place
        return c[self.read], k[self.read]  # (B, S, ·)

    def attend(self, layer_idx: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float) -> torch.Tensor:
        from ..kernels import paged_mla_decode  # Triton loads only when the kernel is used

        # one query per row at `positions`: it sees positions 0 .. p, so p + 1 keys (a padding row: none)
        o = paged_mla_decode(q_lat[:, :, 0], q_pe[:, :, 0], self.cache.c_kv[layer_idx], self.cache.k_pe[layer_idx],
                             self.tables, self.positions + 1, self.cache.block_size, scale, use_triton=True)
        return o.unsqueeze(2)  # (B, H, 1, r)


def decode_hidden(model: DeepSeekModel, cache: PagedLatentCache, staged: torch.Tensor, kernel: bool = False
                  ) -> torch.Tensor:
    """staged (B, 2 + W) int64 rows [token, position, block table] → final hidden states (B, d)."""
    ids, positions, tables = staged[:, :1], staged[:, 1], staged[:, 2:]
    batch = DecodeBatch(cache, tables, positions, kernel)
    return model.hidden_states(ids, cache=batch, start_pos=positions.clamp(min=0), sync_free=True)[:, 0]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class StaticDecoder:
    """Fixed per-bucket buffers for decode steps, replayed as CUDA graphs, compiled, or run eagerly."""

    def __init__(self, model: DeepSeekModel, cache: PagedLatentCache, max_num_seqs: int, max_blocks: int,
                 mode: str = "graphs", compile_backend: str = "inductor", paged_kernel: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
        device = cache.c_kv.device
        if mode == "graphs" and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use mode 'compiled' or 'static' elsewhere")
        if paged_kernel is None:  # the Triton paged-attention kernel wherever it can run natively
            paged_kernel = device.type == "cuda" and _triton_available()
        self.model, self.cache, self.mode, self.kernel = model, cache, mode, paged_kernel
        self.width = 2 + max_blocks
        self.buckets = buckets_up_to(max_num_seqs)
        pin = device.type == "cuda"
        self.host = {b: torch.zeros(b, self.width, dtype=torch.long, pin_memory=pin) for b in self.buckets}
        self.staged = {b: torch.zeros(b, self.width, dtype=torch.long, device=device) for b in self.buckets}
        self.step = decode_hidden
        if mode == "compiled":
            self.step = torch.compile(decode_hidden, fullgraph=True, dynamic=False, backend=compile_backend)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if mode == "graphs":
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        # largest bucket first: the shared pool is sized by it and the smaller graphs reuse its memory
        pool = None
        for b in reversed(self.buckets):
            staged = self.staged[b]
            self._fill_padding(b, 0)
            staged.copy_(self.host[b])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation and autotuning happen outside the graph
                    decode_hidden(self.model, self.cache, staged, self.kernel)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = decode_hidden(self.model, self.cache, staged, self.kernel)
            pool = graph.pool()
            self.graphs[b] = graph
        # the warm-ups and captures wrote padding latents to the scratch slot only: the cache is untouched

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _fill_padding(self, b: int, n: int) -> None:
        host = self.host[b]
        host[n:].zero_()
        host[n:, 1] = -1

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One decode step for n ≤ max_num_seqs sequences → hidden states (n, d) of their new tokens."""
        n = len(tokens)
        b = self.bucket(n)
        if b is None:
            raise ValueError(f"{n} decodes exceed the largest bucket ({self.buckets[-1]})")
        host = self.host[b]
        rows = [[tok, pos, *table, *[0] * (self.width - 2 - len(table))]
                for tok, pos, table in zip(tokens, positions, block_tables)]
        host[:n] = torch.tensor(rows, dtype=torch.long)
        self._fill_padding(b, n)
        # the step's one host → device copy; the host buffer is rewritten only next step, after the engine
        # has read this step's sampled ids back (a sync), so the asynchronous copy has long finished
        self.staged[b].copy_(host, non_blocking=True)
        if self.mode == "graphs":
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self.step(self.model, self.cache, self.staged[b], self.kernel)[:n]
