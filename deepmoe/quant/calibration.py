"""Calibration token windows for AWQ: S windows of T tokens, evenly spaced over a token stream.

The default text is the *training* split of the data the model was trained on (train_config.json beside the
weights; the Python standard library when there is none), so the held-out split `deepmoe eval` scores stays
unseen by the calibration. `--calib-data` names other text in any form `deepmoe train` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .scheme import QuantError


def windows(stream: np.ndarray, samples: int, seq_len: int, what: str) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens spread evenly from the start to the end of `stream`
    (overlapping only if the stream is shorter than samples · seq_len, which is refused) → (S, T) int64."""
    if samples < 1 or seq_len < 2:
        raise QuantError(f"calibration needs at least one window of two tokens, got {samples} x {seq_len}")
    need = samples * seq_len
    if len(stream) < need:
        raise QuantError(f"calibration data {what} has {len(stream):,} tokens; {samples} samples of {seq_len} "
                         f"tokens need {need:,}: pass more text (--calib-data) or lower --calib-samples / "
                         f"--calib-seq-len")
    starts = np.linspace(0, len(stream) - seq_len, samples).round().astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(stream[s:s + seq_len], dtype=np.int64) for s in starts]))


def calibration_tokens(model_dir: str | Path, samples: int, seq_len: int, data: str | None = None,
                       text_field: str = "text", cache_dir: str | None = None) -> tuple[torch.Tensor, str]:
    """→ ((samples, seq_len) token ids, a description of the text they came from)."""
    from ..data import read_documents, split_documents
    from ..tokenizer import load_tokenizer
    from ..train.config import TrainConfig, default_cache_dir
    from ..train.data import token_stream
    from ..train.state import TRAIN_CONFIG

    model_dir = Path(model_dir)
    try:
        tok = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise QuantError(f"AWQ calibration tokenises text with the model's tokenizer, and {model_dir} has none "
                         f"usable ({e})") from None
    cache = str(Path(cache_dir or default_cache_dir()) / "tokens")
    if data is not None:
        docs = read_documents(data, text_field)
        return windows(token_stream(docs, tok, cache, "calib"), samples, seq_len, repr(data)), str(data)
    saved = TrainConfig.from_json(model_dir / TRAIN_CONFIG) if (model_dir / TRAIN_CONFIG).is_file() else None
    source = saved.data if saved else None
    docs = read_documents(source, saved.text_field if saved else "text")
    train_docs, _ = split_documents(docs, saved.val_fraction if saved else 0.05, saved.seed if saved else 0)
    what = f"training split of {source or 'python stdlib'}"
    # named as `deepmoe train` names it, so a model trained on this machine finds its stream cached
    return windows(token_stream(train_docs, tok, cache, "train"), samples, seq_len, what), what
