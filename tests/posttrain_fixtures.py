"""A micro model directory for the post-training tests: a tiny V3-style MoE with MTP and a BPE tokenizer
trained on arithmetic text (so task prompts are a few dozen tokens)."""

from __future__ import annotations

from pathlib import Path

from deepmoe.checkpoint import save_pretrained
from deepmoe.model import build_model
from deepmoe.tasks import Arithmetic
from deepmoe.tokenizer import train_bpe

from .conftest import v3_config

TASK = "arithmetic:max_digits=2,ops=+-"


def micro_model_dir(path: Path, seed: int = 0, vocab: int = 400, head_scale: float = 1.0, **config) -> Path:
    """Save a freshly initialised micro model and its tokenizer in `path`. head_scale > 1 sharpens its
    next-token distributions (a random model's are nearly uniform): a teacher with something to teach."""
    task = Arithmetic(max_digits=2, ops="+-")
    texts = [p.question + p.solution for p in task.problems("train", 300, seed=99)]
    tok = train_bpe(texts + ["hello there, how are you today?", "the answer is 42"] * 5, vocab)
    cfg = v3_config(**{"vocab_size": 512, "rope_scaling": None, "max_position_embeddings": 256, **config})
    model = build_model(cfg, seed=seed)
    model.lm_head.weight.data.mul_(head_scale)
    save_pretrained(model, path)
    tok.save(path)
    return path
