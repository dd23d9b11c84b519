"""`deepmoe convert`: rewrite a checkpoint directory tensor by tensor (FP8 or int8/int4 → bf16, re-sharding).

Streaming, without building a model: each tensor is read, dequantized if it is an FP8 block weight,
cast, and appended to the current output shard, so memory stays near one shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, SafetensorsFiles, by_shard, _fp8_block, _int_scheme, _key_files, _read_config,
                         write_weights)
from .durable import atomic_write, atomic_write_text, fsync_file, mkdir
from .fp8 import dequantize_fp8_block

# what a model directory holds besides config.json and the weights: copied along by convert and merge
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja")


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """Copy those of `names` that src holds into dst, a directory being built (renamed into place later), each
    fsynced so the rename publishes complete files."""
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            fsync_file(dst / name)


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * scale)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise ValueError(f"cannot parse size {text!r}; use e.g. 500MB or 5GB")


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16,
                       max_shard_size: int = 5 * 2**30) -> dict:
    src, dst = Path(src), Path(dst)
    cfg = _read_config(src)  # validates the config before anything is written
    if dst.resolve() == src.resolve():
        raise CheckpointError("convert writes a new directory; choose a destination other than the source")
    files = SafetensorsFiles()
    key_files = _key_files(src, files)
    block = _fp8_block(cfg)
    scheme = _int_scheme(cfg)  # int8/int4 codes (deepmoe quantize) are dequantized like fp8 blocks
    dst = mkdir(dst)
    keys = sorted(k for k in key_files if not k.endswith(("_scale_inv", ".weight_scale", ".weight_shape")))
    counts = {"bytes": 0, "dequantized": 0}

    def tensors():  # streamed: one shard's tensors in memory at a time
        for key in keys:
            t = files.read(key_files, key)
            if scheme is not None and key.endswith(".weight_packed"):
                from .quant.format import from_disk
                from .quant.scheme import decode

                base = key.removesuffix("_packed")
                t = decode(from_disk(t, scheme.bits), files.read(key_files, base + "_scale"), scheme.bits, dtype)
                key = base
                counts["dequantized"] += 1
            elif t.dtype == torch.float8_e4m3fn:
                scale_key = key + "_scale_inv"
                if block is None or scale_key not in key_files:
                    raise CheckpointError(f"{key_files[key].name}: {key} is fp8 but has no {scale_key}")
                t = dequantize_fp8_block(t, files.read(key_files, scale_key), block, dtype)
                counts["dequantized"] += 1
            elif t.is_floating_point() and not key.endswith("e_score_correction_bias"):
                t = t.to(dtype)
            counts["bytes"] += t.nbytes
            yield key, t

    n = write_weights(dst, by_shard(tensors(), max_shard_size))  # replaces an older checkpoint in dst safely
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(dst / "config.json", json.dumps(raw, indent=2, sort_keys=True))
    for name in SIDE_FILES:
        if (src / name).is_file():
            atomic_write(dst / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))
    return {"tensors": len(keys), "dequantized": counts["dequantized"], "shards": n, "bytes": counts["bytes"]}
