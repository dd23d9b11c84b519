"""The `deepmoe` command: thin argument parsing that calls into the package."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def cmd_info(args) -> int:
    from .config import ModelConfig
    from .stats import format_stats, model_stats

    if args.model:
        cfg, name = ModelConfig.from_json(Path(args.model) / "config.json"), args.model
    elif args.config:
        cfg, name = ModelConfig.from_json(args.config), args.config
    else:
        cfg, name = ModelConfig.from_preset(args.preset), args.preset
    print(format_stats(name, cfg, model_stats(cfg)))
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint, parse_size

    t0 = time.perf_counter()
    r = convert_checkpoint(args.src, args.dst, dtype=args.dtype, max_shard_size=parse_size(args.max_shard_size))
    print(f"wrote {args.dst}: {r['tensors']} tensors ({r['dequantized']} dequantized from fp8), "
          f"{r['shards']} shard(s), {r['bytes'] / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .checkpoint import load_pretrained
    from .generate import generate
    from .tokenizer import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.model, device=device, dtype=args.dtype).eval()
    tok = load_tokenizer(args.model)
    ids = torch.tensor([tok.encode(args.prompt)], device=device)
    out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=tok.eos_id, seed=args.seed)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_serve(args) -> int:
    import os

    try:
        from .serve.app import build_app
        from .serve.limits import ServerLimits
        from .serve.server import run
    except ImportError as e:
        print(f"deepmoe serve: error: {e}; install the server's dependencies with: pip install 'deepmoe[serve]'",
              file=sys.stderr)
        return 2
    from .engine.llm import LLM

    # checked before the model loads: a bad flag should not cost a load
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_prompts_per_request=args.max_prompts_per_request,
                          max_seqs_per_request=args.max_seqs_per_request, max_waiting_seqs=args.max_waiting_seqs,
                          read_timeout_s=args.read_timeout_s, shutdown_grace_s=args.shutdown_grace_s)
    llm = LLM(args.model, device=args.device, dtype=args.dtype,
              kv_cache_bytes=args.kv_cache_mb * 2**20 if args.kv_cache_mb else None, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, speculative=args.speculative,
              cuda_graphs=not args.no_cuda_graphs, adapter=args.adapter)
    name = args.served_model_name or Path(args.model).resolve().name
    api_key = args.api_key or os.environ.get("DEEPMOE_API_KEY") or None
    run(build_app(llm.engine, name, api_key=api_key, limits=limits), args.host, args.port)
    return 0


def cmd_merge(args) -> int:
    from .convert import parse_size
    from .lora import merge_adapter

    t0 = time.perf_counter()
    r = merge_adapter(args.adapter, args.out, base=args.model, max_shard_size=parse_size(args.max_shard_size))
    print(f"wrote {args.out}: {r['base']} + {args.adapter}, {r['merged']} of {r['tensors']} tensors changed, "
          f"{r['shards']} shard(s) in {time.perf_counter() - t0:.1f}s")
    return 0


# ---- train / eval ---------------------------------------------------------------------------------
# help text per TrainConfig field; flags are --field-name, types come from the dataclass
TRAIN_HELP = {
    "preset": "model preset (default: tiny on CPU, ref-813M on CUDA)",
    "model_config": "a model config.json instead of a preset (flag: --config)",
    "data": "corpus: text file, folder, .jsonl or .parquet (default: this Python's standard library)",
    "text_field": "JSONL/Parquet field holding the text",
    "tokenizer": "tokenizer directory to use instead of training BPE on the corpus",
    "val_fraction": "fraction of documents held out for validation",
    "out": "run directory (default: runs/<preset>)",
    "cache_dir": "tokenizer/token cache (default: $DEEPMOE_CACHE or ~/.cache/deepmoe)",
    "seq_len": "tokens per sequence", "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step", "steps": "optimizer steps",
    "lr": "peak learning rate", "min_lr_ratio": "cosine floor as a fraction of --lr",
    "warmup_steps": "linear warmup steps", "schedule": "multistep (DeepSeek), cosine or constant",
    "decay_at": "multistep: comma-separated fractions of the run where the rate drops",
    "decay_factor": "multistep: factor applied at each drop",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "eps": "AdamW epsilon", "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clip (0: off)",
    "mtp_weight": "lambda: weight of the multi-token-prediction loss",
    "bias_update_rate": "gamma: aux-loss-free balancing bias step (0: off)",
    "aux_loss_alpha": "alpha: sequence-wise balance loss weight (default: the model config's)",
    "capacity_factor": "cap experts at this multiple of the mean load, dropping the rest (default: dropless)",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available)",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, or fp8 (DeepSeek-V3's FP8 GEMMs; "
                 "emulated exactly on CPU)",
    "activation_checkpointing": "recompute each block in backward to save memory",
    "compile": "torch.compile each decoder block", "seed": "seed of initialisation, split and data order",
    "max_bad_steps": "consecutive non-finite steps before the run stops",
    "eval_every": "steps between validation passes", "eval_batches": "batches per periodic validation",
    "checkpoint_every": "steps between checkpoints", "keep_checkpoints": "checkpoints kept on disk",
    "plots": "write PNG plots into the run directory", "progress": "show the progress bar",
    "sample_tokens": "tokens of the greedy sample written at the end",
}
# what may differ from the saved config when resuming: logging, checkpointing, where things live, and the
# run length (a longer run also moves the multistep/cosine decay points; every other flag must match)
RESUME_OVERRIDES = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "plots", "progress",
                    "sample_tokens", "device", "eval_batches", "max_bad_steps", "out", "cache_dir"}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    import dataclasses
    import typing

    from .train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in TRAIN_HELP:
            continue
        flag = "--config" if f.name == "model_config" else "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=TRAIN_HELP[f.name])
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "decay_at":
            p.add_argument(flag, type=lambda s: tuple(float(v) for v in s.split(",")), **kw)
        else:
            base = next(t for t in (int, float, str) if t == kind or t in typing.get_args(kind))
            p.add_argument(flag, type=base, **kw)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def cmd_train(args) -> int:
    import dataclasses

    import torch

    from .train.config import TrainConfig, resolve
    from .train.loop import train
    from .train.state import TRAIN_CONFIG

    given = {k: v for k, v in vars(args).items() if k in TRAIN_HELP}
    cfg, model_cfg = resolve(TrainConfig(**given), torch.cuda.is_available())
    if args.resume:
        saved_path = Path(cfg.out) / TRAIN_CONFIG
        if not saved_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {str(saved_path)!r} does not exist")
        saved = TrainConfig.from_json(saved_path)
        changed = sorted(k for k, v in given.items() if k not in RESUME_OVERRIDES and getattr(saved, k) != v)
        if changed:
            raise ValueError(f"--resume continues the saved run; these flags would change it: "
                             f"{', '.join('--' + k.replace('_', '-') for k in changed)} (remove them)")
        keep = {k: v for k, v in given.items() if k in RESUME_OVERRIDES}
        cfg, model_cfg = resolve(dataclasses.replace(saved, **keep), torch.cuda.is_available())
    summary = train(cfg, model_cfg, resume=args.resume)
    print(f"done      {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['train_time_s']:.0f}s "
          f"({summary['tokens_per_s']:,} tok/s), {summary['skipped_steps']} skipped")
    if summary["val_loss"] is not None:
        print(f"val       loss {summary['val_loss']:.4f}  ppl {summary['val_ppl']:.2f}  "
              f"bits/byte {summary['val_bpb']:.4f}")
    print(f"model     {summary['final']}")
    if summary["plots"]:
        print(f"plots     {', '.join(str(Path(cfg.out) / p) for p in summary['plots'])}")
    if summary["sample"]:
        print("sample    greedy, prompt 'def ':\n" + summary["sample"])
    return 0


def cmd_eval(args) -> int:
    import torch

    from .checkpoint import load_pretrained
    from .data import PackedDataset, read_documents, split_documents
    from .tokenizer import load_tokenizer
    from .train.config import TrainConfig, default_cache_dir
    from .train.data import text_bytes, token_stream
    from .train.evaluate import evaluate
    from .train.state import TRAIN_CONFIG

    model_dir = Path(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(model_dir, device=device, dtype=args.dtype, load_mtp=False)
    tok = load_tokenizer(model_dir)
    saved = TrainConfig.from_json(model_dir / TRAIN_CONFIG) if (model_dir / TRAIN_CONFIG).is_file() else None
    if args.data:
        docs, what = read_documents(args.data, args.text_field), args.data
    else:  # the held-out split of the data the model was trained on
        data = saved.data if saved else None
        docs = split_documents(read_documents(data, saved.text_field if saved else "text"),
                               saved.val_fraction if saved else 0.05, saved.seed if saved else 0)[1]
        what = f"held-out split of {data or 'python stdlib'}"
    seq_len = args.seq_len or (saved.seq_len if saved and saved.seq_len else 256)
    cache = args.cache_dir or default_cache_dir()  # this machine's, not the one the model was trained on
    tokens = token_stream(docs, tok, str(Path(cache) / "tokens"), "eval")
    r = evaluate(model, PackedDataset(tokens, seq_len), args.batch_size, args.max_batches,
                 text_bytes(docs) / len(tokens))
    print(f"eval      {what}: {len(docs)} documents, {r['tokens']:,} tokens (seq_len {seq_len})")
    print(f"          loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bits/byte {r['bpb']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepmoe", description="DeepSeek-V2/V3 MoE models in compact PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and KV-cache size of a preset, config or model")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny",
                     help="a shipped preset (tiny, ref-813M, deepseek-v2-lite, deepseek-v3)")
    src.add_argument("--config", help="a config.json file")
    src.add_argument("--model", help="a model directory")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="rewrite a checkpoint: FP8 → bf16, re-shard")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--dtype", type=_dtype, default="bf16")
    conv.add_argument("--max-shard-size", default="5GB")
    conv.set_defaults(func=cmd_convert)

    gen = sub.add_parser("generate", help="continue a prompt with a model directory")
    gen.add_argument("--model", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", type=_dtype, default="fp32")
    gen.set_defaults(func=cmd_generate)

    tr = sub.add_parser("train", help="pretrain a model (default: tiny preset on the Python stdlib)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_train_flags(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="validation loss, perplexity and bits/byte of a model directory")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", help="evaluate on these documents (default: the held-out split it trained on)")
    ev.add_argument("--text-field", default="text")
    ev.add_argument("--seq-len", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int, default=None)
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--device", default=None)
    ev.add_argument("--dtype", type=_dtype, default="fp32")
    ev.set_defaults(func=cmd_eval)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    srv.add_argument("model", metavar="MODEL_DIR")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="default: 8000")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $DEEPMOE_API_KEY)")
    srv.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL_DIR's name)")
    srv.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    srv.add_argument("--dtype", type=_dtype, default=None, help="default: fp32 for an fp32 checkpoint, else bf16")
    srv.add_argument("--kv-cache-mb", type=int, default=None,
                     help="memory of the paged KV cache (default: what the GPU has left, 256 on CPU)")
    srv.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default: 64)")
    srv.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step (default: 2048)")
    srv.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs MTP weights)")
    srv.add_argument("--no-cuda-graphs", action="store_true",
                     help="run decode steps eagerly on CUDA instead of replaying CUDA graphs (for debugging)")
    srv.add_argument("--adapter", default=None, help="a LoRA adapter directory to serve on top of MODEL_DIR "
                     "(merged into the weights at load)")
    # the server's limits (deepmoe/serve/limits.py, same names and defaults)
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="bigger bodies get 413 (default: 1 MiB)")
    srv.add_argument("--max-prompts-per-request", type=int, default=64,
                     help="more prompts in one completions request get 400 (default: 64)")
    srv.add_argument("--max-seqs-per-request", type=int, default=256,
                     help="more sequences (prompts x n) in one request get 400 (default: 256)")
    srv.add_argument("--max-waiting-seqs", type=int, default=1024,
                     help="queued sequences; a request that would exceed it gets 503 + Retry-After (default: 1024)")
    srv.add_argument("--read-timeout-s", type=float, default=30.0,
                     help="a request body must arrive within this many seconds, else 408 (default: 30)")
    srv.add_argument("--shutdown-grace-s", type=float, default=30.0,
                     help="on SIGTERM/Ctrl-C, requests still running after this get an error event and [DONE] "
                          "(default: 30)")
    srv.set_defaults(func=cmd_serve)

    mrg = sub.add_parser("merge", help="fold a LoRA adapter into its base: a full model directory")
    mrg.add_argument("adapter", metavar="ADAPTER_DIR")
    mrg.add_argument("out", metavar="OUT_DIR")
    mrg.add_argument("--model", default=None, help="the base model directory (default: the adapter's "
                     "base_model_name_or_path)")
    mrg.add_argument("--max-shard-size", default="5GB")
    mrg.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    from .train.loop import TrainingError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TrainingError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"deepmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
