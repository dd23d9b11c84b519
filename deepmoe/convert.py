"""`deepmoe convert`: rewrite a checkpoint directory tensor by tensor (FP8 → bf16, re-sharding).

Streaming, without building a model: each tensor is read, dequantized if it is an FP8 block weight,
cast, and appended to the current output shard, so memory stays near one shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import (INDEX_NAME, CheckpointError, SafetensorsFiles, _atomic_save_file, _fp8_block, _key_files,
                         _read_config, atomic_write_text)
from .fp8 import dequantize_fp8_block

_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "chat_template.jinja")


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
    dst.mkdir(parents=True, exist_ok=True)
    keys = sorted(k for k in key_files if not k.endswith("_scale_inv"))
    weight_map, current, size, total, dequantized = {}, {}, 0, 0, 0
    tmp_names = []

    def flush():
        nonlocal current, size
        if current:
            name = f".part-{len(tmp_names):05d}.safetensors"
            _atomic_save_file(current, dst / name)
            tmp_names.append((name, list(current)))
            current, size = {}, 0

    for key in keys:
        t = files.read(key_files, key)
        if t.dtype == torch.float8_e4m3fn:
            scale_key = key + "_scale_inv"
            if block is None or scale_key not in key_files:
                raise CheckpointError(f"{key_files[key].name}: {key} is fp8 but has no {scale_key}")
            t = dequantize_fp8_block(t, files.read(key_files, scale_key), block, dtype)
            dequantized += 1
        elif t.is_floating_point() and not key.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        if current and size + t.nbytes > max_shard_size:
            flush()
        current[key] = t.contiguous()
        size += t.nbytes
        total += t.nbytes
    flush()
    n = len(tmp_names)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for stale in dst.glob("model*.safetensors"):
        stale.unlink()
    for (tmp, names), name in zip(tmp_names, final):
        (dst / tmp).replace(dst / name)
        weight_map.update({k: name for k in names})
    if n > 1:
        atomic_write_text(dst / INDEX_NAME, json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=2))
    elif (dst / INDEX_NAME).exists():
        (dst / INDEX_NAME).unlink()
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(dst / "config.json", json.dumps(raw, indent=2, sort_keys=True))
    for name in _COPY:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return {"tensors": len(keys), "dequantized": dequantized, "shards": n, "bytes": total}
