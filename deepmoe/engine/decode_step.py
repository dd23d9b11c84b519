"""The decode step with static shapes: what a CUDA graph replays and `torch.compile(fullgraph=True)` proves.

A decode batch (every sequence computing one new token, plus its draft tokens when decoding speculatively)
runs from fixed buffers sized for its batch-size bucket and its query width T (1, or 1 + drafts): one
int64 row per sequence, `[T tokens, start position, valid token count, block table ...]`, padded to the
widest block table a sequence can have (max context / block size). A row shorter than T (a sequence
without a draft this step) and the padding rows of a bucket (count 0) write their extra latents into the
cache's scratch slot, and their outputs are dropped. Inside the step nothing reads a value back to the
host and no shape depends on data: cache slots are computed on the device from the block table,
attention reads the latent through the table with a position mask (or the paged kernel reads it in
place), the routed experts use their sync-free formulation. The host copies one small pinned tensor in
and reads the sampled ids out.

Speculative decoding runs two static steps per engine step: the main model over the last token and the
drafts (T = 2 for MTP depth 1), then, once the host has chosen the new tokens, the MTP layer over the
same positions (h_prev is the first step's output buffer, read in place) to propose the next drafts.

Modes: "graphs" captures one CUDA graph per (bucket, T, step) (after a warm-up, all sharing one memory
pool) and replays it; "compiled" runs the step through `torch.compile(fullgraph=True, dynamic=False)`,
which fails on any graph break and so proves on a CPU that the step is capturable; "static" runs it
eagerly (for comparison). Prefill chunks keep the general path of the model runner.
"""

from __future__ import annotations

import torch

from ..model import DeepSeekModel
from .kv_cache import PagedLatentCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODES = ("static", "compiled", "graphs")
HEADER = 2  # the columns after a row's T tokens: start position, valid token count


def buckets_up_to(max_num_seqs: int) -> list[int]:
    """The bucket sizes a scheduler allowing max_num_seqs decodes per step needs (the last covers it)."""
    out = [b for b in BUCKETS if b < max_num_seqs]
    return out + [max_num_seqs]


class DecodeBatch:
    """The model's LatentCache view for a static decode step: slots computed on the device.
    tables (B, W) block ids; row b's count[b] tokens sit at positions start[b] .. (count 0: a padding row).
    With `kernel`, attention reads the cache's blocks in place (kernels/paged_mla_decode.py), one query
    at a time; otherwise every row's W·block_size positions are gathered and masked by position (the
    torch path, and the reference)."""

    def __init__(self, cache: PagedLatentCache, tables: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
                 T: int, kernel: bool = False):
        bs, W = cache.block_size, tables.shape[1]
        self.cache, self.tables, self.kernel = cache, tables, kernel
        offsets = torch.arange(T, device=tables.device)
        pos = start[:, None] + offsets  # (B, T)
        valid = offsets < count[:, None]
        # a token past the row's count may lie past the last block a row can have: clamp the lookup
        block = (pos.clamp(min=0) // bs).clamp(max=W - 1)
        slot = tables.gather(1, block) * bs + pos.clamp(min=0) % bs
        self.write = torch.where(valid, slot, cache.scratch)  # (B, T)
        # keys each query sees: positions 0 .. its own (none for a dropped token)
        self.lengths = torch.where(valid, pos + 1, 0)
        if not kernel:
            every = torch.arange(W * bs, device=tables.device)  # positions 0 .. W·bs - 1
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

        B, H, T, R = q_lat.shape
        # each of a row's T queries is one decode query over its own prefix of the row's blocks
        tables = self.tables if T == 1 else self.tables.repeat_interleave(T, dim=0)
        o = paged_mla_decode(q_lat.transpose(1, 2).reshape(B * T, H, R),
                             q_pe.transpose(1, 2).reshape(B * T, H, q_pe.shape[-1]),
                             self.cache.c_kv[layer_idx], self.cache.k_pe[layer_idx], tables,
                             self.lengths.reshape(-1), self.cache.block_size, scale, use_triton=True)
        return o.view(B, T, H, R).transpose(1, 2)  # (B, H, T, R)


def _unpack(cache: PagedLatentCache, staged: torch.Tensor, T: int, kernel: bool):
    ids, start, count, tables = staged[:, :T], staged[:, T], staged[:, T + 1], staged[:, T + HEADER:]
    return ids, DecodeBatch(cache, tables, start, count, T, kernel), start.clamp(min=0)


def decode_hidden(model: DeepSeekModel, cache: PagedLatentCache, staged: torch.Tensor, T: int = 1,
                  kernel: bool = False) -> torch.Tensor:
    """staged (B, T + 2 + W) int64 rows [tokens, start, count, block table] → final hidden states (B, T, d)."""
    ids, batch, start = _unpack(cache, staged, T, kernel)
    return model.hidden_states(ids, cache=batch, start_pos=start, sync_free=True)


def draft_hidden(model: DeepSeekModel, cache: PagedLatentCache, staged: torch.Tensor, h_prev: torch.Tensor,
                 T: int = 1, kernel: bool = False) -> torch.Tensor:
    """MTP depth 1 at the positions of a decode step: staged rows as in decode_hidden but holding the token
    after each position, h_prev (B, T, d) the main model's hidden states there → MTP hidden states (B, T, d)."""
    ids, batch, start = _unpack(cache, staged, T, kernel)
    return model.mtp_hidden(1, h_prev, ids, cache=batch, start_pos=start, sync_free=True)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class StaticDecoder:
    """Fixed buffers per (bucket, T) for decode steps, replayed as CUDA graphs, compiled, or run eagerly.
    draft_tokens: drafts verified per step (0 without speculation; MTP depth 1 drafts one), which adds the
    query width 1 + draft_tokens and the MTP drafting step."""

    def __init__(self, model: DeepSeekModel, cache: PagedLatentCache, max_num_seqs: int, max_blocks: int,
                 mode: str = "graphs", compile_backend: str = "inductor", paged_kernel: bool | None = None,
                 draft_tokens: int = 0):
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
        device = cache.c_kv.device
        if mode == "graphs" and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use mode 'compiled' or 'static' elsewhere")
        if draft_tokens and not len(model.mtp):
            raise ValueError("drafting needs the model's MTP layer")
        if paged_kernel is None:  # the Triton paged-attention kernel wherever it can run natively
            paged_kernel = device.type == "cuda" and _triton_available()
        self.model, self.cache, self.mode, self.kernel = model, cache, mode, paged_kernel
        self.max_blocks, self.draft_tokens = max_blocks, draft_tokens
        self.buckets = buckets_up_to(max_num_seqs)
        self.widths = [1] + ([1 + draft_tokens] if draft_tokens else [])
        pin = device.type == "cuda"
        # per (step, bucket, T): "main" runs the model, "draft" the MTP layer; one host and one device buffer
        keys = [(step, b, T) for step in ("main", "draft")[:1 + bool(draft_tokens)]
                for b in self.buckets for T in self.widths]
        self.host = {k: torch.zeros(k[1], k[2] + HEADER + max_blocks, dtype=torch.long, pin_memory=pin) for k in keys}
        self.staged = {k: torch.zeros_like(h, device=device) for k, h in self.host.items()}
        self.main, self.draft_step = decode_hidden, draft_hidden
        if mode == "compiled":
            self.main = torch.compile(decode_hidden, fullgraph=True, dynamic=False, backend=compile_backend)
            self.draft_step = torch.compile(draft_hidden, fullgraph=True, dynamic=False, backend=compile_backend)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.last: tuple | None = None  # the key of the last main step, whose output drafting reads
        if mode == "graphs":
            self._capture(keys)

    def _call(self, key: tuple) -> torch.Tensor:
        step, b, T = key
        if step == "main":
            return self.main(self.model, self.cache, self.staged[key], T, self.kernel)
        return self.draft_step(self.model, self.cache, self.staged[key], self.outputs[("main", b, T)], T, self.kernel)

    @torch.inference_mode()
    def _capture(self, keys: list[tuple]) -> None:
        # largest bucket first: the shared pool is sized by it and the smaller graphs reuse its memory. A
        # main step's output stays allocated (held in self.outputs), so no later graph writes over it and the
        # drafting graph of its bucket reads it in place.
        pool = None
        for key in sorted(keys, key=lambda k: (-k[1], k[2], k[0] != "main")):
            self._fill_padding(key, 0)
            self.staged[key].copy_(self.host[key])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation and autotuning happen outside the graph
                    self.outputs[key] = self._call(key)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self._call(key)
            pool = graph.pool()
            self.graphs[key] = graph
        # the warm-ups and captures wrote padding latents to the scratch slot only: the cache is untouched

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def fits(self, n: int, widths: list[int]) -> bool:
        """Whether n rows of these query widths run as one static step."""
        return self.bucket(n) is not None and max(widths) in self.widths

    def _fill_padding(self, key: tuple, n: int) -> None:
        host, T = self.host[key], key[2]
        host[n:].zero_()
        host[n:, T] = -1  # start -1, count 0: everything the row writes goes to the scratch slot

    def _launch(self, key: tuple, tokens: list[list[int]], starts: list[int], block_tables: list[list[int]]
                ) -> torch.Tensor:
        n, T = len(tokens), key[2]
        host = self.host[key]
        rows = [[*toks, *[0] * (T - len(toks)), start, len(toks), *table, *[0] * (self.max_blocks - len(table))]
                for toks, start, table in zip(tokens, starts, block_tables)]
        host[:n] = torch.tensor(rows, dtype=torch.long)
        self._fill_padding(key, n)
        # the step's one host → device copy; the host buffer is rewritten only at its next use, after the
        # engine has read this step's sampled ids back (a sync), so the asynchronous copy has long finished
        self.staged[key].copy_(host, non_blocking=True)
        if self.mode == "graphs":
            self.graphs[key].replay()
        else:
            self.outputs[key] = self._call(key)
        return self.outputs[key][:n]

    @torch.inference_mode()
    def run(self, tokens: list[list[int]], starts: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One decode step: row i computes tokens[i] (its pending token, then its drafts) from position
        starts[i] → hidden states (n, T, d), T the widest row; a shorter row's extra outputs are padding."""
        n, T = len(tokens), max(len(t) for t in tokens)
        if not self.fits(n, [T]):
            raise ValueError(f"{n} rows of {T} tokens do not fit a static step (buckets up to {self.buckets[-1]}, "
                             f"widths {self.widths})")
        self.last = ("main", self.bucket(n), T)
        return self._launch(self.last, tokens, starts, block_tables)

    @torch.inference_mode()
    def draft(self, next_ids: list[list[int]], starts: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """MTP depth 1 over the rows and positions of the last `run` (its output is h_prev), next_ids[i] the
        tokens after row i's first len(next_ids[i]) positions → MTP hidden states (n, T, d)."""
        if self.last is None or not self.draft_tokens:
            raise RuntimeError("draft follows a main decode step of a decoder built with draft_tokens")
        _, b, T = self.last
        if max(len(t) for t in next_ids) > T or self.bucket(len(next_ids)) != b:
            raise ValueError("draft rows must be the last decode step's rows")
        self.last = None  # its output is consumed: a second draft would read stale states
        return self._launch(("draft", b, T), next_ids, starts, block_tables)
