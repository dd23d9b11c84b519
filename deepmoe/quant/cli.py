"""The `deepmoe quantize` subcommand's parser and command (registered by deepmoe/cli.py)."""

from __future__ import annotations

import time


def add_quantize_parser(sub) -> None:
    from ..cli_args import at_least, device, model_dir, shard_size
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
    a = p.add_argument_group("AWQ (int8/int4): activation-aware scales from calibration text, folded into the "
                             "layers before (no cost at run time)")
    a.add_argument("--awq", action="store_true", help="search per-input-channel AWQ scales on calibration text before rounding")
    a.add_argument("--calib-data", default=None, metavar="PATH",
                   help="calibration text: a file, folder, .jsonl or .parquet (default: the training split of the "
                        "data the model was trained on, from its train_config.json; else the Python stdlib)")
    a.add_argument("--text-field", default="text", help="the text field of --calib-data's .jsonl/.parquet rows")
    a.add_argument("--calib-samples", type=at_least(1), default=64, help="calibration windows")
    a.add_argument("--calib-seq-len", type=at_least(2), default=256, help="tokens per calibration window")
    a.add_argument("--clip", action="store_true",
                   help="also search each group's clipping ratio (off by default: it raised the held-out perplexity "
                        "of the model measured in docs/quantization.md)")
    a.add_argument("--device", type=device, default=None,
                   help="where AWQ runs the model: cpu, cuda or cuda:N (default: cuda if available)")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from .quantize import quantize_checkpoint
    from .scheme import QuantError, QuantScheme

    t0 = time.perf_counter()
    scheme = QuantScheme(args.scheme, args.group_size)
    awq_only = [flag for flag, on in (("--calib-data", args.calib_data is not None), ("--clip", args.clip))
                if on]
    if awq_only and not args.awq:
        raise QuantError(f"{' and '.join(awq_only)} apply to --awq only")
    if args.awq:
        import torch

        from pathlib import Path

        from .calibration import calibration_tokens
        from .quantize import awq_quantize_checkpoint, check_source

        if scheme.fp8:
            raise QuantError("--awq applies to int8/int4; fp8 (128x128 blocks) is rounded directly")
        check_source(Path(args.src), Path(args.dst), scheme)  # before tokenising the calibration text
        tokens, what = calibration_tokens(args.src, args.calib_samples, args.calib_seq_len, args.calib_data,
                                          args.text_field)
        print(f"awq       calibration: {tokens.shape[0]} windows of {tokens.shape[1]} tokens from the {what}")
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        r = awq_quantize_checkpoint(args.src, args.dst, scheme, tokens, args.skip, args.clip, dev,
                                    args.max_shard_size, log=print)
        a = r["awq"]
        print(f"awq       {a.layers} layers, {a.groups} scale searches (median alpha "
              f"{sorted(a.alphas)[len(a.alphas) // 2] if a.alphas else 0:.2f}), relative output error summed over "
              f"them {a.error_rtn:.4g} (rounding) -> {a.error_awq:.4g}; {a.clipped} projections clip-searched; "
              f"{a.experts_without_tokens} routed experts got no calibration token (plain rounding for their "
              f"down_proj); MTP layers rounded without AWQ")
    else:
        r = quantize_checkpoint(args.src, args.dst, scheme, args.skip, args.max_shard_size)
    mib = 2**20
    layout = "128x128 blocks" if scheme.fp8 else f"group {args.group_size}"
    print(f"quantised {r['quantized']} of {r['tensors']} tensors to {args.scheme} ({layout}): "
          f"{r['source_bytes'] / mib:.2f} MiB as stored ({r['bf16_bytes'] / mib:.2f} MiB as bf16) → "
          f"{r['quantized_bytes'] / mib:.2f} MiB ({r['quantized_bytes'] / r['bf16_bytes']:.3f}x bf16)")
    print(f"wrote {args.dst}: {r['total_bytes'] / mib:.2f} MiB of weights in {r['shards']} shard(s), "
          f"{time.perf_counter() - t0:.1f}s")
    return 0
