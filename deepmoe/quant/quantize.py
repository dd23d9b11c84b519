"""`deepmoe quantize`: write a model directory's projections as int8 / int4 (round to nearest) or as fp8
128×128 blocks (DeepSeek-V3's release format).

Which tensors: every 2-D `*.weight` of the checkpoint — the attention and MLP projections of the decoder
and MTP layers, the shared experts, and each routed expert — except the embedding, the head (and the MTP
layers' copies of both) and the routers (`mlp.gate`), which stay in the source precision, as do norms and
biases (1-D). `skip` adds regular expressions searched in the checkpoint module names
(e.g. `layers\\.0\\.`, `kv_b_proj`); a layer's routed experts are quantised all together or not at all.

Streaming like `deepmoe convert`: one tensor read, quantised and appended to the current shard at a time.
Every name is checked first (group sizes, skip patterns), so a bad request writes nothing; the output is
written into a hidden directory beside OUT and renamed onto it when complete (`durable.replace_dir`), so a
crash never leaves a half-written OUT.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint import (CheckpointError, SafetensorsFiles, _EXPERT, _fp8_block, _key_files, _read_config, by_shard,
                          write_weights)
from ..convert import SIDE_FILES, copy_side_files
from ..durable import atomic_write_text, mkdir, mkdtemp, replace_dir
from ..fp8 import dequantize_fp8_block
from .format import disk_tensors, quantization_config
from .modules import set_weight, swap_modules
from .scheme import QuantError, QuantScheme

KEEP = (r"embed_tokens$", r"(^|\.)lm_head$", r"shared_head\.head$", r"\.mlp\.gate$")  # always high precision


def targets(shapes: dict[str, tuple[int, ...]], skip: list[str] = ()) -> list[str]:
    """Checkpoint keys (of {key: shape}) to quantise; raises on a bad pattern or a split expert stack."""
    try:
        patterns = [re.compile(p) for p in (*KEEP, *skip)]
    except re.error as e:
        raise QuantError(f"bad --skip pattern: {e}") from None
    chosen, experts = [], {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        module = key.removesuffix(".weight")
        take = not any(p.search(module) for p in patterns)
        m = _EXPERT.match(key)
        if m:
            experts.setdefault(m.group(1), set()).add(take)
        if take:
            chosen.append(key)
    split = [prefix for prefix, takes in experts.items() if len(takes) > 1]
    if split:
        raise QuantError(f"--skip matches some but not all routed experts of {split[0]}; quantise a layer's "
                         f"experts together (a pattern like '{re.escape(split[0])}\\.')")
    return chosen


def hf_module(name: str, num_layers: int) -> str:
    """A model module name → its checkpoint name (MTP depth j is layer num_layers + j)."""
    if name.startswith("mtp."):
        _, j, rest = name.split(".", 2)
        return f"model.layers.{num_layers + int(j)}.{rest.removeprefix('block.')}"
    return name


def target_modules(model, scheme: QuantScheme, skip: list[str] = ()) -> list[str]:
    """The model's modules (nn.Linear layers and routed Experts) whose weights `deepmoe quantize` replaces,
    chosen by `targets` on their checkpoint names; a clear error if a weight does not fit the scheme."""
    from torch import nn

    from ..model.experts import Experts

    L = model.config.num_hidden_layers
    shapes, owner = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight is not model.model.embed_tokens.weight:
            hf = hf_module(name, L)
            shapes[hf + ".weight"], owner[hf + ".weight"] = tuple(m.weight.shape), name
        elif isinstance(m, Experts):
            hf = hf_module(name, L)
            for e in range(m.n_experts):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    key = f"{hf}.{e}.{p}.weight"
                    shapes[key], owner[key] = tuple(getattr(m, p).shape[1:]), name
    chosen = targets(shapes, skip)
    for key in chosen:  # group sizes first: fail before anything changes
        scheme.group_for(shapes[key][-1], key)
    return sorted({owner[k] for k in chosen})


def quantize_model(model, scheme: QuantScheme, skip: list[str] = ()) -> list[str]:
    """Quantise a built model in place (what loading a `quantize_checkpoint` output gives); → module names."""
    from torch import nn

    if scheme.fp8:
        raise QuantError("fp8 is an on-disk format (deepmoe loads it dequantised): quantize_checkpoint it and "
                         "load the directory")
    names = target_modules(model, scheme, skip)
    weights = {n: model.get_submodule(n) for n in names}
    swap_modules(model, set(names), scheme)
    for n in names:
        old, new = weights[n], model.get_submodule(n)
        if isinstance(old, nn.Linear):
            set_weight(new.quant, old.weight, scheme, n)
        else:
            for p in ("gate_proj", "up_proj", "down_proj"):
                set_weight(getattr(new, p), getattr(old, p), scheme, f"{n}.{p}")
    return names


def check_source(src: Path, dst: Path, scheme: QuantScheme):
    """src's config, after refusing what cannot be quantised as asked (an already-quantised model, OUT = MODEL)."""
    cfg = _read_config(src)
    qc = cfg.extra.get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors":
        bits = qc.get("config_groups", {}).get("group_0", {}).get("weights", {}).get("num_bits")
        raise QuantError(f"{src} is already quantised ({bits}-bit compressed-tensors); quantise the original "
                         f"high-precision model")
    block = _fp8_block(cfg)
    if block is not None and scheme.fp8:
        raise QuantError(f"{src} is already fp8 ({block[0]}x{block[1]} blocks); it is the format asked for")
    if dst.resolve() == src.resolve():
        raise QuantError("quantize writes a new directory; choose OUT other than MODEL")
    return cfg


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: QuantScheme, skip: list[str] = (),
                        max_shard_size: int = 5 * 2**30) -> dict:
    """Write `dst`, a copy of `src` with its projections quantised; → counts and byte sizes."""
    src, dst = Path(src), Path(dst)
    cfg = check_source(src, dst, scheme)
    block = _fp8_block(cfg)
    files = SafetensorsFiles()
    key_files = _key_files(src, files)
    shapes = {k: tuple(files[f].get_slice(k).get_shape()) for k, f in key_files.items() if not k.endswith("_scale_inv")}
    chosen = set(targets(shapes, skip))
    for key in sorted(chosen):
        scheme.group_for(shapes[key][-1], key)
    stats = {"tensors": len(shapes), "quantized": len(chosen), "source_bytes": 0, "bf16_bytes": 0,
             "quantized_bytes": 0, "total_bytes": 0}

    def read(key: str) -> torch.Tensor:
        t = files.read(key_files, key)
        if t.dtype == torch.float8_e4m3fn:
            if block is None or key + "_scale_inv" not in key_files:
                raise CheckpointError(f"{key_files[key].name}: {key} is fp8 but has no {key}_scale_inv")
            t = dequantize_fp8_block(t, files.read(key_files, key + "_scale_inv"), block, torch.float32)
        return t

    def tensors():  # streamed: one shard's tensors in memory at a time
        for key in sorted(shapes):
            t = read(key)
            if key in chosen:
                out = disk_tensors(key, t, scheme)
                stats["source_bytes"] += t.nbytes
                stats["bf16_bytes"] += t.numel() * 2
                stats["quantized_bytes"] += sum(v.nbytes for v in out.values())
            else:
                out = {key: t}
            for k, v in out.items():
                stats["total_bytes"] += v.nbytes
                yield k, v

    tmp = mkdtemp(f".{dst.name}.", mkdir(dst.parent.resolve()))
    try:
        stats["shards"] = write_weights(tmp, by_shard(tensors(), max_shard_size))
        raw = json.loads((src / "config.json").read_text())
        raw.pop("quantization_config", None)  # an fp8 source was dequantised
        ignore = sorted({k.removesuffix(".weight") for k, s in shapes.items()
                         if k.endswith(".weight") and len(s) == 2 and k not in chosen})
        raw["quantization_config"] = quantization_config(scheme, ignore)
        atomic_write_text(tmp / "config.json", json.dumps(raw, indent=2, sort_keys=True))
        copy_side_files(src, tmp, SIDE_FILES + ("train_config.json",))
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def awq_quantize_checkpoint(src: str | Path, dst: str | Path, scheme: QuantScheme, tokens: torch.Tensor,
                            skip: list[str] = (), clip: bool = False, device: str = "cpu",
                            max_shard_size: int = 5 * 2**30, log=None) -> dict:
    """`quantize_checkpoint` after AWQ: load src (fp32, on `device`), fold AWQ scales (and clipping) found on
    the calibration windows `tokens` (S, T) into it, write that high-precision model into a hidden directory
    beside dst in src's dtype, and quantise it into dst; → quantize_checkpoint's stats plus "awq" (the
    AwqReport). Nothing is written to dst unless every step succeeds."""
    from ..checkpoint import load_pretrained, save_pretrained
    from .awq import apply_awq

    src, dst = Path(src), Path(dst)
    check_source(src, dst, scheme)
    if scheme.fp8:
        raise QuantError("--awq applies to int8/int4; fp8 (128x128 blocks) is rounded directly")
    files = SafetensorsFiles()
    key_files = _key_files(src, files)
    stored = files[key_files["lm_head.weight"]].get_slice("lm_head.weight").get_dtype()
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.bfloat16)
    model = load_pretrained(src, device=device, dtype=torch.float32)
    report = apply_awq(model, tokens, scheme, skip, clip, log=log)
    tmp = mkdtemp(f".{dst.name}.awq.", mkdir(dst.parent.resolve()))
    try:
        save_pretrained(model.cpu(), tmp, max_shard_size, dtype)
        del model
        raw = json.loads((src / "config.json").read_text())
        raw.pop("quantization_config", None)  # an fp8 source is written dequantised
        ours = json.loads((tmp / "config.json").read_text())
        ours.update({k: v for k, v in raw.items() if k not in ("torch_dtype", "dtype")})  # src's fields verbatim
        atomic_write_text(tmp / "config.json", json.dumps(ours, indent=2, sort_keys=True))
        copy_side_files(src, tmp, SIDE_FILES + ("train_config.json",))
        stats = quantize_checkpoint(tmp, dst, scheme, skip, max_shard_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats["awq"] = report
    return stats
