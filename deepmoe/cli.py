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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepmoe", description="DeepSeek-V2/V3 MoE models in compact PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and KV-cache size of a preset, config or model")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="a shipped preset (tiny, ref-813M, deepseek-v2-lite, deepseek-v3)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"deepmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
