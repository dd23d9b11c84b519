"""Packing: documents become one token stream, cut into fixed-length training sequences.

Every document is encoded and followed by eos, and the results are concatenated, so no token is padding
and the model learns where documents end. Sequence i is the window stream[i*T : i*T + T + 1]: its first T
tokens are the input x, its last T the next-token targets y. Input windows tile the stream without
overlap, so each token is a target exactly once per epoch. Tokenizers and token streams are cached on disk
under keys that change with the corpus and the tokenizer, so the stdlib is trained on and tokenized once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..durable import mkdtemp
from ..tokenizer import Tokenizer, train_bpe

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 256  # documents per encode_batch call: enough to keep the Rust threads busy, bounded memory


def tokenize_documents(tokenizer: Tokenizer, texts: Iterable[str]) -> np.ndarray:
    """The uint32 token stream (N,) of `texts`, each document followed by the eos id, in order."""
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token, which packing needs as the document separator")
    parts: list[np.ndarray] = []
    texts = iter(texts)
    while chunk := list(islice(texts, _ENCODE_CHUNK)):
        # same as Tokenizer.encode per document (no special tokens added), but parallel across the chunk
        for enc in tokenizer.backend.encode_batch(chunk, add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.uint32))
            parts.append(np.array([eos], dtype=np.uint32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hex digest of the vocabulary, merges and special tokens: keys the token-stream cache."""
    h = hashlib.sha256(tokenizer.backend.to_str().encode("utf-8"))
    h.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)).encode("utf-8"))
    return h.hexdigest()


def load_or_train_tokenizer(cache_dir: str | os.PathLike, train_texts: Callable[[], Iterable[str]],
                            vocab_size: int, corpus_fingerprint: str) -> Tokenizer:
    """The BPE tokenizer for this corpus and vocab size, from `cache_dir` if one was trained before, else
    trained on `train_texts()` (the training split only, so val stays unseen) and saved there."""
    cache_dir = Path(cache_dir)
    target = cache_dir / f"tokenizer-v{vocab_size}-{corpus_fingerprint[:16]}"
    if not target.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("training a byte-level BPE tokenizer (vocab %d) on the training split; cached in %s",
                 vocab_size, target)
        tokenizer = train_bpe(train_texts(), vocab_size)
        # build the whole directory beside the target and rename it in one step: a crash mid-save leaves
        # only a temp dir, never a half-written tokenizer that later runs would load
        tmp = mkdtemp(prefix=f".{target.name}.", dir=cache_dir)
        try:
            tokenizer.save(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # otherwise a concurrent run got there first; use its copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # load even right after training, so the first and every later run use byte-identical tokenizers
    return Tokenizer.from_dir(target)


def cached_token_stream(cache_dir: str | os.PathLike, name: str, tokenizer_fingerprint: str,
                        build: Callable[[], np.ndarray]) -> np.ndarray:
    """A token stream computed once and kept as `<name>-<fingerprint>.npy`. On a miss `build()` is called
    and returns the stream, e.g. `lambda: tokenize_documents(tok, (d.read() for d in docs))`, so the
    texts are only read when the cache lacks them. `name` must identify the texts (e.g. split and corpus
    fingerprint); `tokenizer_fingerprint` (see `tokenizer_fingerprint()`) identifies the tokenizer."""
    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"cache name must be a plain file name, got {name!r}")
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{name}-{tokenizer_fingerprint[:16]}.npy"
    if not path.is_file():
        stream = build()
        if not isinstance(stream, np.ndarray):
            raise TypeError("build must return the token stream (np.ndarray) to cache, e.g. "
                            "lambda: tokenize_documents(tokenizer, texts)")
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=cache_dir)
        try:
            with os.fdopen(fd, "wb") as f:  # a file object, so np.save does not append its own ".npy"
                np.save(f, stream)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    # memory-mapped: a large stream costs page cache, not process memory, and opens instantly
    return np.load(path, mmap_mode="r")


class PackedDataset:
    """Fixed-length training sequences over a 1-D token stream (N,). Sequence i: x = stream[i*T : i*T+T],
    y = stream[i*T+1 : i*T+T+1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len
        self.num_sequences = max(len(tokens) - 1, 0) // seq_len
        if self.num_sequences == 0:
            raise ValueError(f"the token stream has {len(tokens)} tokens, too few for one sequence of {seq_len} "
                             "(+1 target); use a shorter seq_len or more data")

    def __len__(self) -> int:
        return self.num_sequences

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, int64 (B, T) each, for the sequences at `indices`."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0:
            raise ValueError(f"indices must be a non-empty list of sequence numbers, got {indices!r}")
        if idx.min() < 0 or idx.max() >= self.num_sequences:
            raise IndexError(f"sequence index out of range [0, {self.num_sequences}): {indices!r}")
        T = self.seq_len
        windows = self.tokens[idx[:, None] * T + np.arange(T + 1)].astype(np.int64)  # (B, T+1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]


class BatchSampler:
    """An endless, resumable stream of index batches: each epoch visits the sequences in a fresh order fixed
    by (seed, epoch), `batch_size` at a time, dropping the remainder. `state_dict()` is the position
    (epoch, step); loading it into a sampler built the same way continues with exactly the same batches."""

    def __init__(self, num_sequences: int, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_sequences < batch_size:
            raise ValueError(f"the dataset has {num_sequences} sequences, fewer than batch_size={batch_size}; "
                             "use a smaller batch size or seq_len, or more data")
        self.num_sequences, self.batch_size, self.seed = num_sequences, batch_size, seed
        self.steps_per_epoch = num_sequences // batch_size
        self.epoch, self.step = 0, 0
        self._order: np.ndarray | None = None  # permutation of the current epoch, (num_sequences,)

    def _permutation(self, epoch: int) -> np.ndarray:
        # a fresh generator per epoch keyed by (seed, epoch): any position is reachable without replay
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> list[int]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._permutation(self.epoch)
        start = self.step * self.batch_size
        self.step += 1
        return self._order[start:start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "num_sequences": self.num_sequences, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_sequences", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved sampler had {key}={state[key]} but this one has "
                                 f"{getattr(self, key)}; resume with the same data, seq_len, batch size and seed")
        self.epoch, self.step, self._order = int(state["epoch"]), int(state["step"]), None
