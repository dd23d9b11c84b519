"""The paged KV cache's bookkeeping: which fixed-size block holds which tokens of which sequence.

Pure Python, no torch; the model runner owns the memory the block ids index. Full blocks are
content-addressed by a hash chained over the whole prefix (a block's hash covers every token before it),
so two prompts sharing a prefix share its blocks: reference counts say how many sequences use a block.
A block whose count drops to zero goes back on the free list but keeps its hash and contents until it is
handed out again, so a later request with the same prefix still hits it (least recently freed reused
first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from .sequence import Sequence


def block_hash(tokens: list[int], prev: bytes | None) -> bytes:
    """Hash of one full block given the hash of the block before it (None for the first)."""
    h = hashlib.blake2b(prev or b"", digest_size=16)
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set once the block is full
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self.by_hash: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Token slots in the whole cache: no sequence can hold more."""
        return len(self.blocks) * self.block_size

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    # ---- prompts ---------------------------------------------------------------------------------
    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the cached prefix of seq: full blocks whose chained hash and tokens match, stopping
        at the first miss. The block with the last token is never reused, so the model always computes at
        least one token (whose logits sample the next)."""
        hits, prev = [], None
        for i in range((len(seq) - 1) // self.block_size):
            tokens = seq.block_tokens(i, self.block_size)
            prev = block_hash(tokens, prev)
            block_id = self.by_hash.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks(self.block_size) - len(hits) <= len(self.free) - reused_free

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, sharing cached prefix blocks."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free blocks for {seq!r}")
        hits = self._prefix_hits(seq)
        seq.block_table = [self._take(block_id).block_id for block_id in hits]
        seq.num_cached_tokens = len(hits) * self.block_size
        for i in range(len(hits), seq.num_blocks(self.block_size)):
            block = self._take_fresh()
            block.token_ids = seq.block_tokens(i, self.block_size)
            seq.block_table.append(block.block_id)

    def commit(self, seq: Sequence) -> None:
        """Make seq's full blocks whose latents are now computed (the first num_cached_tokens tokens)
        findable by later requests. Only computed blocks are registered: a block allocated for a prefill
        that has not run yet must not be taken as a cache hit."""
        prev = None
        for i in range(seq.num_cached_tokens // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = block_hash(block.token_ids, prev)
                self.by_hash[block.hash] = block.block_id
            prev = block.hash

    # ---- decoding --------------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """Whether the tokens just appended to seq fit: a new block is needed for each that starts one
        (slots reserved for drafts may hold them already)."""
        return seq.num_blocks(self.block_size) - len(seq.block_table) <= len(self.free)

    def append(self, seq: Sequence, num_new: int = 1) -> None:
        """Account for the num_new tokens just appended to seq (after `can_append`): blocks for them, and the
        contents of every block they land in."""
        if not self.can_append(seq):
            raise RuntimeError(f"no free block for {seq!r}; check can_append first")
        while len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._take_fresh().block_id)
        for i in range((len(seq) - num_new) // self.block_size, seq.num_blocks(self.block_size)):
            self.blocks[seq.block_table[i]].token_ids = seq.block_tokens(i, self.block_size)

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for num_tokens slots (speculative tokens past the end of seq); all or nothing."""
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_fresh().block_id)
        return True

    def deallocate(self, seq: Sequence) -> None:
        """Release seq's blocks (finished, aborted or preempted). Shared blocks stay with their other users;
        freed blocks keep their hash and contents for later prefix hits until they are reused."""
        for block_id in reversed(seq.block_table):  # tail first: the head is the likelier shared prefix
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents; nothing new can hit them)."""
        for block in self.blocks:
            block.hash = None
        self.by_hash.clear()

    # ---- internals -------------------------------------------------------------------------------
    def _take(self, block_id: int) -> Block:
        """Another user of a cached block (in use, or free but still holding its contents)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
        return block

    def _take_fresh(self) -> Block:
        """The least recently freed block, wiped: its old contents stop being a cache entry."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.by_hash.get(block.hash) == block_id:
            del self.by_hash[block.hash]
        block.hash, block.token_ids, block.ref_count = None, [], 1
        return block
