"""Hugging Face DeepSeek-V2/V3 checkpoints, both ways.

The in-memory model uses checkpoint names except in two places, mapped here:
  - routed experts: `...mlp.experts.{e}.gate_proj.weight` (one key per expert) ↔ the stacked
    parameter `...mlp.experts.gate_proj` [E, ...];
  - MTP depth j (0-based): `model.layers.{L+j}.{enorm,hnorm,eh_proj,shared_head.norm}` ↔ `mtp.{j}.*`,
    its decoder block `model.layers.{L+j}.<block keys>` ↔ `mtp.{j}.block.*`, and the checkpoint's
    copies of the shared embedding/head (`embed_tokens`, `shared_head.head`) ↔ the main ones.
Loading builds the model on the meta device, validates every key and shape against the safetensors
headers first, then streams tensor by tensor into the final storage (FP8 blocks dequantized on the
target device), so peak memory is about one model and a bad checkpoint fails before any weights load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .durable import atomic_write_text, fsync_dir, fsync_file, mkdir, rename, resolve_dir, write_temp
from .fp8 import dequantize_fp8_block
from .model import DeepSeekModel

log = logging.getLogger("deepmoe")

INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_ARCHS = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read."""


# ---- names ---------------------------------------------------------------------------------------
def hf_to_internal(key: str, cfg: ModelConfig) -> tuple[str, int | None, bool]:
    """Checkpoint key → (model key, expert index or None, is a shared-weight copy)."""
    shared = False
    m = _LAYER.match(key)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        j, rest = int(m.group(1)) - cfg.num_hidden_layers, m.group(2)
        if rest in _MTP_SHARED:
            return _MTP_SHARED[rest], None, True
        key = f"mtp.{j}.{rest}" if rest.startswith(_MTP_OWN) else f"mtp.{j}.block.{rest}"
    m = _EXPERT.match(key)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2)), shared
    return key, None, shared


def internal_to_hf(model: DeepSeekModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor view) for everything a Hugging Face checkpoint holds."""
    return state_to_hf(model.state_dict(keep_vars=False), model.config)


def state_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig, shared_copies: bool = True
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """internal_to_hf for a model's state dict (the live one, or a copy of it in host memory). shared_copies=False
    leaves out the MTP layers' copies of the embedding and head (`mtp_shared_copies`), for a writer that gets the
    state dict in parts."""
    L = cfg.num_hidden_layers
    for name, t in state.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it on load
        if name.startswith("mtp."):
            _, j, rest = name.split(".", 2)
            name = f"model.layers.{L + int(j)}.{rest.removeprefix('block.')}"
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            for e in range(t.shape[0]):
                yield f"{m.group(1)}.{e}.{m.group(2)}.weight", t[e]
            continue
        yield name, t
    if shared_copies:
        yield from mtp_shared_copies(state, cfg)


def mtp_shared_copies(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The release format repeats the embedding and the head in every MTP layer (they are shared)."""
    L = cfg.num_hidden_layers
    for j in range(cfg.num_nextn_predict_layers):
        yield f"model.layers.{L + j}.embed_tokens.weight", state["model.embed_tokens.weight"]
        yield f"model.layers.{L + j}.shared_head.head.weight", state["lm_head.weight"]


# ---- reading -------------------------------------------------------------------------------------
class SafetensorsFiles(dict):
    """Open safetensors handles by path, each file opened (and its header parsed) once."""

    def __missing__(self, file: Path):
        handle = self[file] = _open(file)
        return handle

    def read(self, key_files: dict[str, Path], key: str) -> torch.Tensor:
        return self[key_files[key]].get_tensor(key)


def _key_files(path: Path, files: SafetensorsFiles) -> dict[str, Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = {f: path / f for f in set(weight_map.values())}
        for f in files.values():
            if not f.is_file():
                raise CheckpointError(f"{index} lists {f.name}, which does not exist in {path}")
        return {k: files[f] for k, f in weight_map.items()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files (and no {INDEX_NAME}) in {path}")
    out: dict[str, Path] = {}
    for f in shards:
        for k in files[f].keys():
            out[k] = f
    return out


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None


def _read_config(path: Path) -> ModelConfig:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: a model config must be a JSON object, got {type(raw).__name__}")
    archs = set(raw.get("architectures") or [])
    if archs and not archs & SUPPORTED_ARCHS:
        raise CheckpointError(f"{cfg_file}: unsupported architecture {sorted(archs)}; deepmoe loads "
                              f"{sorted(SUPPORTED_ARCHS)}")
    try:
        return ModelConfig.from_hf_dict(raw)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{cfg_file}: {e}") from None


def _fp8_block(cfg: ModelConfig) -> tuple[int, int] | None:
    q = cfg.extra.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") == "compressed-tensors":
        return None  # int8/int4 weight-only: _int_scheme
    if q.get("quant_method") != "fp8":
        raise CheckpointError(f"unsupported quantization_config {q.get('quant_method')!r} (deepmoe reads DeepSeek "
                              f"fp8 blocks and compressed-tensors int8/int4 written by `deepmoe quantize`)")
    return tuple(q.get("weight_block_size", (128, 128)))


def _int_scheme(cfg: ModelConfig):
    """The int8/int4 scheme of a compressed-tensors checkpoint (`deepmoe quantize`), else None."""
    q = cfg.extra.get("quantization_config")
    if not q or q.get("quant_method") != "compressed-tensors":
        return None
    from .quant import QuantError, read_scheme

    try:
        return read_scheme(q)
    except QuantError as e:
        raise CheckpointError(str(e)) from None


def _quantized_modules(key_files: Iterable[str], cfg: ModelConfig, skip_layers: set[int]) -> set[str]:
    """The model modules a quantised checkpoint stores as codes: those with a `weight_packed` key."""
    from .quant.format import module_of, split_key

    out = set()
    for key in key_files:
        base, part = split_key(key)
        m = _LAYER.match(key)
        if part == "qweight" and not (m and int(m.group(1)) in skip_layers):
            out.add(module_of(hf_to_internal(base, cfg)[0]))
    return out


def load_pretrained(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
                    load_mtp: bool = True) -> DeepSeekModel:
    """Load a DeepseekV2ForCausalLM / DeepseekV3ForCausalLM directory (single or sharded, bf16 or FP8), in
    eval mode like transformers' from_pretrained (parameters still require grad: call .train() to train)."""
    path = resolve_dir(given := Path(path))
    if path != given:
        log.warning("%s is missing but an interrupted replacement left its previous copy at %s; loading that",
                    given, path)
    cfg = _read_config(path)
    files = SafetensorsFiles()
    key_files = _key_files(path, files)
    block = _fp8_block(cfg)
    scheme = _int_scheme(cfg)
    if dtype is None:
        declared = cfg.extra.get("torch_dtype") or cfg.extra.get("dtype")
        dtype = torch.float32 if block is None and declared == "float32" else torch.bfloat16
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    has_mtp = any((m := _LAYER.match(k)) and int(m.group(1)) >= L for k in key_files)
    skip_mtp = D and (not has_mtp or not load_mtp)
    skip_layers = set(range(L, L + D)) if skip_mtp else set()
    if skip_mtp:
        if not has_mtp:  # transformers drops MTP weights when it saves; the config still declares them
            log.warning("%s: config declares %d MTP layer(s) but the checkpoint holds no MTP weights; "
                        "loading without MTP", path, D)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    elif not D:  # MTP weights a config without MTP does not declare: transformers ignores them, so do we
        mtp = sorted({int(m.group(1)) for k in key_files if (m := _LAYER.match(k)) and int(m.group(1)) >= L
                      and m.group(2).startswith("eh_proj.")})
        if mtp:
            log.warning("%s: the checkpoint holds %d MTP layer(s) but num_nextn_predict_layers is 0; loading "
                        "without MTP", path, len(mtp))
            skip_layers = set(mtp)

    with torch.device("meta"):
        model = DeepSeekModel(cfg)
    model = model.to(dtype)
    if scheme is not None:  # after the cast: the group scales stay fp32
        from .quant.modules import swap_modules

        swap_modules(model, _quantized_modules(key_files, cfg, skip_layers), scheme)
    targets = model.state_dict(keep_vars=True)
    plan = _validate(path, key_files, files, cfg, targets, block, skip_layers)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    targets = model.state_dict(keep_vars=True)
    extremes = {}  # checkpoint key → (min, max) as loaded: NaN or ±inf there means the tensor holds some
    with torch.no_grad():
        for file, keys in plan.items():
            for key, (name, expert) in keys.items():
                t = files[file].get_tensor(key).to(device)
                if name.endswith(".qweight"):
                    from .quant.format import from_disk

                    t = from_disk(t, scheme.bits)
                if t.dtype == torch.float8_e4m3fn:
                    scale = files.read(key_files, key + "_scale_inv").to(device)
                    t = dequantize_fp8_block(t, scale, block, torch.float32)
                dst = targets[name] if expert is None else targets[name][expert]
                dst.copy_(t.to(dst.dtype))
                if dst.is_floating_point() and dst.numel():
                    # a reduction allocates nothing (isfinite would: a byte per weight), and NaN propagates
                    # through min and max; read back once at the end, not one device sync per tensor
                    extremes[key] = torch.stack(torch.aminmax(dst)).float()
        _warn_non_finite(path, model, extremes)
    if scheme is not None and torch.device(device).type == "cpu":
        from .quant import prepare_cpu

        prepare_cpu(model)  # the ATen int8/int4 CPU kernels where they fit
    return model.eval()  # as transformers' from_pretrained: ready for inference; training calls .train()


def _warn_non_finite(path: Path, model: DeepSeekModel, extremes: dict[str, torch.Tensor]) -> None:
    """A checkpoint saved from a diverged run loads like any other and then generates garbage: say so, naming
    the tensors (by checkpoint key) and how many of their values are NaN and inf."""
    if not extremes:
        return
    finite = torch.isfinite(torch.stack(list(extremes.values()))).all(dim=1).tolist()
    bad = [key for key, ok in zip(extremes, finite) if not ok]
    if not bad:
        return
    loaded = dict(internal_to_hf(model))  # the loaded tensor under each checkpoint key, to count the bad values
    counts = [f"{key} ({int(loaded[key].isnan().sum())} NaN, {int(loaded[key].isinf().sum())} inf)" for key in bad[:5]]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    log.warning("%s: %d weight tensor(s) hold NaN or inf values: %s%s; what the model computes from them is "
                "NaN or garbage", path, len(bad), ", ".join(counts), more)


def _validate(path: Path, key_files: dict[str, Path], files: SafetensorsFiles, cfg: ModelConfig,
              targets: dict[str, torch.Tensor],
              block, skip_layers: set[int]) -> dict[Path, dict[str, tuple[str, int | None]]]:
    """Check every key and shape from the headers alone; return file → {key: (model key, expert)}.

    `skip_layers`: MTP layers present in the checkpoint but not loaded."""
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    plan: dict[Path, dict[str, tuple[str, int | None]]] = {}
    needed = {n: (set(range(t.shape[0])) if _is_stacked(n) else None) for n, t in targets.items()}
    if cfg.tie_word_embeddings:  # the head is the embedding: transformers omits it on save, ignores it on load
        needed.pop("lm_head.weight")
    for key, file in key_files.items():
        if key.endswith("_scale_inv"):
            if key.removesuffix("_scale_inv") not in key_files:
                raise CheckpointError(f"{file.name}: {key} has no matching weight")
            continue
        m = _LAYER.match(key)
        if m and int(m.group(1)) >= L + D:
            if int(m.group(1)) in skip_layers:
                continue  # MTP weights we chose not to load
            raise CheckpointError(f"{file.name}: unexpected key {key} (config has {L} layers + {D} MTP)")
        base, part = _split_quant_key(key)
        if part == "shape":  # compressed-tensors' weight_shape: the codes' shape says the same
            continue
        name, expert, shared = hf_to_internal(base, cfg)
        if part is not None:
            from .quant.format import disk_shape, internal_name

            name = internal_name(name, part)
        if name not in targets:
            raise CheckpointError(f"{file.name}: unexpected key {key} for this config")
        sl = files[file].get_slice(key)
        shape = tuple(sl.get_shape())
        if part == "qweight":
            if sl.get_dtype() != "I32":
                raise CheckpointError(f"{file.name}: {key} is {sl.get_dtype()}; weight_packed must be int32")
            shape = disk_shape(shape)
        want = targets[name].shape if expert is None else targets[name].shape[1:]
        if expert is not None and not 0 <= expert < targets[name].shape[0]:
            raise CheckpointError(f"{file.name}: {key}: expert index {expert} out of range "
                                  f"(n_routed_experts={targets[name].shape[0]})")
        if shape != tuple(want):
            raise CheckpointError(f"{file.name}: {key} has shape {list(shape)}, config expects {list(want)}")
        if sl.get_dtype() in ("F8_E4M3", "F8_E5M2"):
            if block is None or key + "_scale_inv" not in key_files:
                raise CheckpointError(f"{file.name}: {key} is fp8 but has no weight_scale_inv / quantization_config")
            _validate_scale(key + "_scale_inv", key_files, files, shape, block)
        if shared or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue  # the MTP copy of the embedding/head, or a tied head: same weights as the embedding
        if expert is None:
            needed.pop(name, None)
        else:
            needed.get(name, set()).discard(expert)
        plan.setdefault(file, {})[key] = (name, expert)
    missing = [n for n, left in needed.items() if left is None or left]
    if missing:
        detail = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: checkpoint is missing weights for {detail}")
    return plan


def _validate_scale(key: str, key_files: dict[str, Path], files: SafetensorsFiles, weight_shape: tuple[int, ...],
                    block: tuple[int, int]) -> None:
    """An fp8 weight [out, in] has one scale per weight_block_size block: [ceil(out/bm), ceil(in/bn)]."""
    file = key_files[key]
    if len(weight_shape) != 2 or len(block) != 2:
        raise CheckpointError(f"{file.name}: {key.removesuffix('_scale_inv')} is fp8 with shape "
                              f"{list(weight_shape)}; fp8 block weights are 2-D with a 2-D weight_block_size")
    found = tuple(files[file].get_slice(key).get_shape())
    want = tuple(-(-n // b) for n, b in zip(weight_shape, block))
    if found != want:
        raise CheckpointError(f"{file.name}: {key} has shape {list(found)}, expected {list(want)} for a "
                              f"{list(weight_shape)} weight in {block[0]}x{block[1]} blocks (weight_block_size)")


def _is_stacked(name: str) -> bool:
    return name.endswith((".experts.gate_proj", ".experts.up_proj", ".experts.down_proj")) or any(
        name.endswith(f".experts.{p}.{part}") for p in ("gate_proj", "up_proj", "down_proj")
        for part in ("qweight", "scales"))


def _split_quant_key(key: str) -> tuple[str, str | None]:
    if not key.endswith((".weight_packed", ".weight_scale", ".weight_shape")):
        return key, None
    from .quant.format import split_key

    return split_key(key)


# ---- writing -------------------------------------------------------------------------------------
# Writing into a directory that already holds a checkpoint never leaves it unloadable: after a crash at
# any step both readers find a complete set of weights, the old or the new. The readers differ: deepmoe
# reads the index if there is one, else every *.safetensors; transformers reads model.safetensors if it
# exists, else the index. So: (1) pin the old weights with an index if they have none; (2) write the new
# shards under hidden temp names; (3) rename each to its final name unless the old index still reads that
# name; (4) switch the index to the new shards (the commit); (5) move the held-back ones onto their final
# names by hard link and point the index there; (6) delete stale files, and the index if one shard remains.
# config.json is written after the weights: a re-save that changes the architecture is not atomic (write a
# new directory and `deepmoe.durable.replace_dir` it onto the old one, as the trainer does).
def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def by_shard(tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Group streamed (checkpoint key, tensor) pairs into write_weights' shards of at most max_shard_size bytes
    (a larger tensor is a shard of its own), one shard in memory at a time."""
    current, size = {}, 0
    for key, t in tensors:
        if current and size + t.nbytes > max_shard_size:
            yield current
            current, size = {}, 0
        current[key] = t.contiguous()
        size += t.nbytes
    if current:
        yield current


def write_weights(path: Path, shards: Iterable[dict[str, torch.Tensor]]) -> int:
    """Write the shards (each a {checkpoint key: tensor} dict, produced one at a time) into `path` under
    their standard names, plus the index when there are several; → the number of shards."""
    index = path / INDEX_NAME
    live = _pin_current_weights(path)  # the names the old checkpoint is read from
    written: list[tuple[Path, list[str]]] = []
    total = 0
    try:
        for tensors in shards:
            # ends in .safetensors: transformers picks the loader by the extension of the names in an index
            tmp = write_temp(path, "model", lambda f, t=tensors: save_file(t, f, metadata={"format": "pt"}),
                             suffix=".tmp.safetensors")
            written.append((tmp, list(tensors)))
            total += sum(t.nbytes for t in tensors.values())
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    # from here on no cleanup on failure: the index may already read a temp shard
    names = shard_names(len(written))
    at = {}  # final name → where its data is now
    for (tmp, _), name in zip(written, names, strict=True):
        if name in live:  # the old index still reads this name: hold the new data back
            at[name] = tmp
        else:  # unread until the index switches (transformers' model.safetensors switches it alone)
            rename(tmp, path / name)
            at[name] = path / name

    def write_index(where: dict[str, Path]) -> None:
        weight_map = {k: where[name].name for (_, keys), name in zip(written, names) for k in keys}
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2))

    if index.exists() or len(names) > 1:
        write_index(at)  # the commit: readers of the index now see only the new weights
        held = [name for name in names if at[name] != path / name]
        for name in held:
            _link_over(at[name], path / name)
        if held:
            write_index({name: path / name for name in names})
            for name in held:
                at[name].unlink()
    for f in [*path.glob("model*.safetensors"), *path.glob(".model*.tmp*")]:
        if f.name not in names:  # the old layout's shards, and temp files of interrupted saves
            f.unlink()
    if len(names) == 1 and index.exists():  # last: until now it kept deepmoe off the stale shards
        index.unlink()
    fsync_dir(path)
    return len(names)


def _pin_current_weights(path: Path) -> set[str]:
    """The file names the current checkpoint in `path` is read from. Without an index, write one that
    lists them: from here on the index alone decides what deepmoe reads, so new shards appearing beside
    the old ones are never mixed in."""
    if (path / INDEX_NAME).is_file():
        try:
            return set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError):  # already unreadable: nothing to keep intact
            return {f.name for f in path.glob("*.safetensors")}
    if not any(path.glob("*.safetensors")):
        return set()
    try:
        key_files = _key_files(path, SafetensorsFiles())
    except CheckpointError:
        return {f.name for f in path.glob("*.safetensors")}
    weight_map = {k: f.name for k, f in key_files.items()}
    total = sum(f.stat().st_size for f in set(key_files.values()))
    atomic_write_text(path / INDEX_NAME, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    return set(weight_map.values())


def _link_over(src: Path, dst: Path) -> None:
    """Atomically make `dst` hold `src`'s data while `src` stays readable: a hard link, else a copy."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, tmp)
    fsync_file(tmp)
    rename(tmp, dst)


def save_pretrained(model: DeepSeekModel, path: str | os.PathLike, max_shard_size: int = 5 * 2**30,
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json + safetensors (sharded above max_shard_size bytes) that transformers loads. Every
    file is fsynced before it is renamed into place; an older checkpoint in `path` is replaced safely."""
    save_state(model.state_dict(keep_vars=False), model.config, path, max_shard_size, dtype)


def save_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike,
               max_shard_size: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
    """save_pretrained from a model's state dict and config: what a trainer's background checkpoint writer
    uses, its state dict being a copy in host memory that training cannot change under it."""
    if any(name.endswith(".qweight") for name in state):
        raise CheckpointError("the model holds quantised weights (deepmoe.quant); save the high-precision model "
                              "and run `deepmoe quantize` on it")
    if any(".base_layer." in name for name in state):
        raise CheckpointError("the model carries LoRA adapters, which a checkpoint cannot hold: save them with "
                              "deepmoe.lora.save_adapter, or fold them in first with deepmoe.lora.merge_lora")
    path = mkdir(path)
    items = list(state_to_hf(state, cfg))
    # plan shards from sizes alone, then materialise one shard at a time
    plan: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in items:
        nbytes = t.numel() * (dtype.itemsize if dtype and t.is_floating_point() and not _keeps_fp32(key)
                              else t.element_size())
        if plan[-1] and size + nbytes > max_shard_size:
            plan.append([])
            size = 0
        plan[-1].append((key, t))
        size += nbytes

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for shard in plan:
            tensors = {}
            for key, t in shard:
                t = t.detach().to("cpu")
                if dtype is not None and t.is_floating_point() and not _keeps_fp32(key):
                    t = t.to(dtype)
                tensors[key] = t.contiguous().clone()  # own storage: safetensors refuses shared memory
            yield tensors

    write_weights(path, shards())
    write_config(cfg, path, dtype or state["lm_head.weight"].dtype)


def write_config(cfg: ModelConfig, path: Path, dtype: torch.dtype) -> None:
    """config.json for weights written (or to be read) as `dtype`."""
    hf = cfg.to_hf_dict()
    hf.pop("quantization_config", None)  # we always write dequantized weights
    hf.pop("dtype", None)  # transformers v5's spelling; one declared dtype only
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2, sort_keys=True))


def _keeps_fp32(key: str) -> bool:
    return key.endswith("e_score_correction_bias")
