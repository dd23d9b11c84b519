"""The `deepmoe quantize` subcommand's parser and command (registered by deepmoe/cli.py)."""

from __future__ import annotations

import time


def add_quantize_parser(sub) -> None:
    from ..cli_args import at_least, model_dir, shard_size
    from .scheme import SCHEMES

    p = sub.add_parser("quantize", help="write a copy of a model with int8/int4 (compressed-tensors) or fp8 "
                                             "(DeepSeek-V3 128x128 blocks) weights")
    p.add_argument("src", metavar="MODEL", type=model_dir, help="the model directory to quantise")
    p.add_argument("dst", metavar="OUT", help="the directory to write (replaced atomically if it exists)")
    p.add_argument("--scheme", required=True, choices=sorted(SCHEMES), help="weight format")
    p.add_argument("--group-size", type=at_least(8), default=128,
                   help="int8/int4: input channels per scale (a multiple of 8; a weight with fewer inputs is one "
                        "group); fp8 always uses 128x128 blocks")
    p.add_argument("--skip", nargs="+", default=[], metavar="PATTERN",
                   help="regular expressions of checkpoint module names to leave in high precision, besides "
                        "the embedding, head and routers (default: none)")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB", help="largest safetensors file")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from .quantize import quantize_checkpoint
    from .scheme import QuantScheme

    t0 = time.perf_counter()
    scheme = QuantScheme(args.scheme, args.group_size)
    r = quantize_checkpoint(args.src, args.dst, scheme, args.skip, args.max_shard_size)
    mib = 2**20
    layout = "128x128 blocks" if scheme.fp8 else f"group {args.group_size}"
    print(f"quantised {r['quantized']} of {r['tensors']} tensors to {args.scheme} ({layout}): "
          f"{r['source_bytes'] / mib:.2f} MiB as stored ({r['bf16_bytes'] / mib:.2f} MiB as bf16) → "
          f"{r['quantized_bytes'] / mib:.2f} MiB ({r['quantized_bytes'] / r['bf16_bytes']:.3f}x bf16)")
    print(f"wrote {args.dst}: {r['total_bytes'] / mib:.2f} MiB of weights in {r['shards']} shard(s), "
          f"{time.perf_counter() - t0:.1f}s")
    return 0
