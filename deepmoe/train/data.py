"""From a data spec to ready batches: documents → split → tokenizer → cached token streams → packed sets.

The tokenizer is trained on the training split only (validation stays unseen), or taken from a given
directory. Both splits are tokenized once and cached by corpus and tokenizer fingerprint, so a second run,
a resume, or `deepmoe eval` start in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import (
    Document,
    PackedDataset,
    cached_token_stream,
    corpus_fingerprint,
    load_or_train_tokenizer,
    read_documents,
    split_documents,
    tokenize_documents,
    tokenizer_fingerprint,
)
from ..tokenizer import Tokenizer


@dataclass
class TrainData:
    tokenizer: Tokenizer
    train: PackedDataset
    val: PackedDataset
    val_bytes_per_token: float  # UTF-8 bytes of the val texts / val tokens: converts nats/token to bits/byte
    train_documents: int
    val_documents: int


def token_stream(docs: list[Document], tokenizer: Tokenizer, cache_dir: str, name: str):
    fp = corpus_fingerprint(docs)
    return cached_token_stream(cache_dir, f"{name}-{fp[:16]}", tokenizer_fingerprint(tokenizer),
                               lambda: tokenize_documents(tokenizer, (d.read() for d in docs)))


def text_bytes(docs: list[Document]) -> int:
    return sum(len(d.read().encode("utf-8", errors="replace")) for d in docs)


def prepare_data(data: str | None, *, seq_len: int, vocab_size: int, cache_dir: str, val_fraction: float = 0.05,
                 seed: int = 0, text_field: str = "text", tokenizer_dir: str | None = None) -> TrainData:
    docs = read_documents(data, text_field)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    if not val_docs:
        raise ValueError(f"the corpus {data or 'stdlib'!r} has a single document; validation needs at least two "
                         "(split a large file into several, or pass a folder)")
    if tokenizer_dir is not None:
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    else:
        tokenizer = load_or_train_tokenizer(Path(cache_dir) / "tokenizers", lambda: (d.read() for d in train_docs),
                                            vocab_size, corpus_fingerprint(train_docs))
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{vocab_size}; use a model config with vocab_size >= {tokenizer.vocab_size}")
    streams = Path(cache_dir) / "tokens"
    train_tokens = token_stream(train_docs, tokenizer, streams, "train")
    val_tokens = token_stream(val_docs, tokenizer, streams, "val")
    return TrainData(tokenizer, PackedDataset(train_tokens, seq_len), PackedDataset(val_tokens, seq_len),
                     text_bytes(val_docs) / len(val_tokens), len(train_docs), len(val_docs))
