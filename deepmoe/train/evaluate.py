"""Held-out evaluation: mean next-token loss, perplexity and bits per byte over fixed sequences."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch

from ..data import PackedDataset
from ..model import DeepSeekModel
from .losses import cross_entropy


@torch.no_grad()
def evaluate(model: DeepSeekModel, dataset: PackedDataset, batch_size: int, max_batches: int | None = None,
             bytes_per_token: float | None = None, autocast: contextlib.AbstractContextManager | None = None,
             batch_loss: Callable[[torch.Tensor, torch.Tensor], float] | None = None) -> dict[str, float]:
    """Mean loss over max_batches · batch_size sequences spread evenly over `dataset` (all of them when None):
    the same sequences at every evaluation of a run, and a sample of the whole split rather than of its
    first documents. bits/byte = loss / ln 2 / bytes_per_token. batch_loss(x, y) → a batch's mean loss, for a
    model that is not one module's forward (a pipeline stage: parallel/pipeline_run.py); default: model(x)'s."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    chosen = np.linspace(0, len(dataset) - 1, n).round().astype(np.int64)  # n distinct sequences
    total, tokens = 0.0, 0
    for start in range(0, n, batch_size):
        x, y = dataset.batch(chosen[start:start + batch_size])
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            loss = cross_entropy(model(x), y) if batch_loss is None else batch_loss(x, y)
        total += float(loss) * y.numel()
        tokens += y.numel()
    model.train(was_training)
    loss = total / tokens
    out = {"loss": loss, "ppl": math.exp(min(loss, 80.0)), "tokens": tokens}
    if bytes_per_token:
        out["bpb"] = loss / math.log(2) / bytes_per_token
    return out
