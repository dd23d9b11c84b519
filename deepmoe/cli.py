"""The `deepmoe` command: thin argument parsing that calls into the package.

One `add_<name>_parser(sub)` function per subcommand builds its parser and points it at `cmd_<name>`;
`build_parser` lists them. The conventions they follow (help with defaults and choices, one way to name a
model directory, arguments checked while parsing) and the helpers for them are in cli_args.py; the
post-training subcommands, whose flags come from their config dataclasses, are in cli_posttrain.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .cli_posttrain import add_distill_parser, add_grpo_parser, add_sft_parser
from .quant.cli import add_quantize_parser
from .cli_args import (DTYPES, Parser, add_dataclass_flags, add_device_dtype, add_model_arg, at_least, device,
                       dtype_name, existing_path, model_dir, non_empty, resolve_model_arg, shard_size, torch_dtype)


# ---- info ---------------------------------------------------------------------------------------------
def add_info_parser(sub) -> None:
    from .config import list_presets

    p = sub.add_parser("info", help="parameter counts and KV-cache size of a preset, config or model; with --plan, "
                                    "memory per GPU and all-to-all traffic of a multi-GPU run (arithmetic)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", choices=list_presets(), help="a shipped preset")
    src.add_argument("--config", type=existing_path, help="a config.json file (default: none, the preset)")
    add_model_arg(p, required=False, group=src)
    g = p.add_argument_group("parallelism plan (arithmetic, not measured: memory per GPU and all-to-all traffic)")
    g.add_argument("--plan", type=plan_spec, default=None, metavar="pp=N,ep=N,dp=N[,zero=N]",
                   help="pipeline stages, expert-parallel size, data-parallel ranks per stage (ep divides it; "
                        "world = pp x dp), ZeRO stage 0-3 (3 = FSDP; default 1) (default: none, no plan)")
    # None = the flag was not given: a plan flag without --plan is refused, and the plan's own default applies
    for flag, kind, choices, default, what in PLAN_FLAGS:
        g.add_argument(flag, type=kind, choices=choices, default=None, help=f"{what} (default: {default})")
    p.set_defaults(func=cmd_info)


# the plan's knobs: flag, type, choices, default shown, help (the defaults themselves are ParallelPlan's)
PLAN_FLAGS = [
    ("--seq-len", at_least(1), None, 4096, "tokens per sequence"),
    ("--micro-batch", at_least(1), None, 1, "sequences per micro-batch"),
    ("--global-batch", at_least(1), None, "dp x micro-batch x pp", "sequences per optimizer step"),
    ("--in-flight", at_least(1), None, "1F1B: pp - stage", "micro-batches whose activations a stage holds"),
    ("--weights", str, ["bf16", "fp8"], "bf16",
     "working weights of the GEMMs (fp8: DeepSeek's, with 128x128 block scales; tokens are then dispatched in fp8)"),
    ("--grads", str, ["fp32", "bf16"], "fp32", "gradients"),
    ("--moments", str, ["fp32", "bf16"], "fp32", "AdamW's two moments (DeepSeek: bf16); master weights are fp32"),
    ("--gpus-per-node", at_least(1), None, 8, "GPUs per node (for the cross-node traffic)"),
]


def plan_spec(text: str) -> dict[str, int]:
    from .parallel.plan import PlanError, parse_plan

    try:
        return parse_plan(text)
    except PlanError as e:
        raise argparse.ArgumentTypeError(str(e))


def cmd_info(args) -> int:
    from .config import ModelConfig
    from .stats import format_stats, model_stats

    names = [flag.removeprefix("--").replace("-", "_") for flag, *_ in PLAN_FLAGS]
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if given and args.plan is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags}: only with a parallelism plan; add --plan pp=N,ep=N,dp=N")
    if args.model:
        cfg, name = ModelConfig.from_json(Path(args.model) / "config.json"), args.model
    elif args.config:
        cfg, name = ModelConfig.from_json(args.config), args.config
    else:
        cfg, name = ModelConfig.from_preset(args.preset), args.preset
    plan = None
    if args.plan is not None:  # checked before the model tree is built for the counts
        from .parallel.plan import ParallelPlan, make_plan
        from .parallel.plan_report import format_plan

        plan = make_plan(cfg, ParallelPlan(**args.plan, **given))
    print(format_stats(name, cfg, model_stats(cfg)))
    if plan is not None:
        print(format_plan(plan))
    return 0


# ---- convert ------------------------------------------------------------------------------------------
def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint: FP8 or int8/int4 → bf16, re-shard")
    p.add_argument("src", type=model_dir, help="the checkpoint directory to read")
    p.add_argument("dst", help="the directory to write (must differ from src)")
    p.add_argument("--dtype", type=dtype_name, choices=list(DTYPES), default="bf16",
                   help="dtype of the written weights (FP8 blocks are dequantized to it)")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB", help="largest safetensors file, e.g. 500MB")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    t0 = time.perf_counter()
    r = convert_checkpoint(args.src, args.dst, dtype=torch_dtype(args.dtype), max_shard_size=args.max_shard_size)
    print(f"wrote {args.dst}: {r['tensors']} tensors ({r['dequantized']} dequantized from fp8 or int8/int4), "
          f"{r['shards']} shard(s), {r['bytes'] / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f}s")
    return 0


# ---- generate -----------------------------------------------------------------------------------------
def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt (or answer it with --chat), streamed as it is made")
    add_model_arg(p)
    p.add_argument("--prompt", required=True, type=non_empty, help="the text to continue (with --chat: to answer)")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message through the model's chat template; print only the reply")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64, help="most tokens to generate")
    # greedy by default so that a command line gives the same text every time; LLM's SamplingParams and the
    # server default to 1.0 like vLLM and OpenAI
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (default: 0 here; SamplingParams and the server default to 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set of tokens with this mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling noise (default: none, a fresh draw)")
    p.add_argument("--speculative", action="store_true",
                   help="draft with the model's MTP layer (needs MTP weights; the same text when greedy)")
    add_device_dtype(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .engine.llm import LLM
    from .engine.sequence import SamplingParams

    # the engine's validation, the one LLM and the server apply, before the model is loaded
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_new_tokens, seed=args.seed)
    llm = LLM(args.model, device=args.device, dtype=torch_dtype(args.dtype), speculative=args.speculative,
              max_num_seqs=1)  # one prompt: no batch buffers or CUDA graphs for larger batches
    if args.chat:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
        print(prompt, end="", flush=True)  # a continuation reads on from its prompt
    try:
        for piece in llm.stream(prompt, params):
            print(piece, end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C ends the text early, without a traceback; 130 is SIGINT's exit code
        print()
        return 130
    print()
    return 0


# ---- serve --------------------------------------------------------------------------------------------
def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=at_least(1, 65535), default=8000, help="port to bind")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $DEEPMOE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL_DIR's name)")
    add_device_dtype(p)
    p.add_argument("--kv-cache-mb", type=at_least(1), default=None,
                   help="memory of the paged KV cache (default: what the GPU has left, 256 on CPU)")
    p.add_argument("--max-num-seqs", type=at_least(1), default=64, help="sequences decoded together")
    p.add_argument("--max-num-batched-tokens", type=at_least(1), default=2048, help="tokens per engine step")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs MTP weights)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run decode steps eagerly on CUDA instead of replaying CUDA graphs (for debugging)")
    p.add_argument("--adapter", default=None, type=existing_path,
                   help="a LoRA adapter directory to serve on top of MODEL_DIR (merged into the weights at load; "
                        "default: none)")
    # the server's limits (deepmoe/serve/limits.py: the same names and defaults, checked there)
    p.add_argument("--max-body-bytes", type=at_least(1), default=1 << 20, help="bigger request bodies get 413")
    p.add_argument("--max-prompts-per-request", type=at_least(1), default=64,
                   help="more prompts in one completions request get 400")
    p.add_argument("--max-seqs-per-request", type=at_least(1), default=256,
                   help="more sequences (prompts x n) in one request get 400")
    p.add_argument("--max-waiting-seqs", type=at_least(1), default=1024,
                   help="queued sequences; a request that would exceed it gets 503 + Retry-After")
    p.add_argument("--read-timeout-s", type=float, default=30.0,
                   help="a request body must arrive within this many seconds, else 408")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C, requests still running after this get an error event and [DONE]")
    p.set_defaults(func=cmd_serve)


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
    llm = LLM(args.model, device=args.device, dtype=torch_dtype(args.dtype),
              kv_cache_bytes=args.kv_cache_mb * 2**20 if args.kv_cache_mb else None, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, speculative=args.speculative,
              cuda_graphs=not args.no_cuda_graphs, adapter=args.adapter)
    name = args.served_model_name or Path(args.model).resolve().name
    api_key = args.api_key or os.environ.get("DEEPMOE_API_KEY") or None
    run(build_app(llm.engine, name, api_key=api_key, limits=limits), args.host, args.port)
    return 0


def add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: a full model directory")
    p.add_argument("adapter", metavar="ADAPTER_DIR", type=existing_path, help="the adapter directory")
    p.add_argument("out", metavar="OUT_DIR", help="where the merged model directory is written")
    p.add_argument("--model", default=None, type=model_dir,
                   help="the base model directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--max-shard-size", default="5GB", type=shard_size, help="largest safetensors shard")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from .lora import merge_adapter

    t0 = time.perf_counter()
    r = merge_adapter(args.adapter, args.out, base=args.model, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}: {r['base']} + {args.adapter}, {r['merged']} of {r['tensors']} tensors changed, "
          f"{r['shards']} shard(s) in {time.perf_counter() - t0:.1f}s")
    return 0


# ---- train --------------------------------------------------------------------------------------------
# help text per TrainConfig field; flags are --field-name, types come from the dataclass. A field whose
# default is None says in its help what it becomes; the others get their default appended.
TRAIN_HELP = {
    "preset": "model preset (default: tiny on CPU, ref-813M on CUDA)",
    "model_config": "a model config.json instead of a preset (flag: --config; default: none, the preset)",
    "data": "corpus: text file, folder, .jsonl or .parquet (default: this Python's standard library)",
    "text_field": "JSONL/Parquet field holding the text",
    "tokenizer": "tokenizer directory to use (default: train byte-level BPE on the corpus)",
    "val_fraction": "fraction of documents held out for validation",
    "out": "run directory (default: runs/<preset>)",
    "cache_dir": "tokenizer/token cache (default: $DEEPMOE_CACHE or ~/.cache/deepmoe)",
    "seq_len": "tokens per sequence (default: 256 for models of hidden size <= 512, else 1024)",
    "batch_size": "sequences per micro-batch (default: 8)",
    "grad_accum": "micro-batches per optimizer step",
    "steps": "optimizer steps (default: 600 for models of hidden size <= 512, else 5000)",
    "lr": "peak learning rate (default: 3e-3 for models of hidden size <= 512, else 1e-3)",
    "min_lr_ratio": "cosine floor as a fraction of --lr",
    "warmup_steps": "linear warmup steps (default: --steps / 20, between 1 and 100)",
    "schedule": "multistep (DeepSeek), cosine or constant",
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
    "qat": "quantisation-aware training: fake-quantise the weights `deepmoe quantize --scheme` int8/int4 would "
           "quantise, in the forward pass (straight-through gradient); quantise the result with the same scheme "
           "(default: off)",
    "qat_group_size": "--qat: input channels per scale, as `deepmoe quantize --group-size`",
    "activation_checkpointing": "recompute each block in backward to save memory",
    "ep": "expert-parallel size under torchrun: ranks that split the routed experts between them (must divide the "
          "world size and the expert count; the rest of the world is FSDP data parallel)",
    "pp": "pipeline-parallel size under torchrun: contiguous stages of decoder layers, one per process, trained "
          "with a 1F1B schedule over the --grad-accum micro-batches (needs --grad-accum >= --pp; not combined with "
          "FSDP or --ep yet)",
    "compile": "torch.compile each decoder block", "seed": "seed of initialisation, split and data order",
    "max_bad_steps": "consecutive non-finite steps before the run stops",
    "eval_every": "steps between validation passes (default: --steps / 10)",
    "eval_batches": "batches per periodic validation",
    "checkpoint_every": "steps between checkpoints (default: --steps / 4)",
    "keep_checkpoints": "checkpoints kept on disk",
    "async_checkpoint": "copy each checkpoint to host memory and write it on a background thread, so training "
                        "does not wait for the disk (off: write it in the loop, with less host memory)",
    "plots": "write PNG plots into the run directory", "progress": "show the progress bar",
    "sample_tokens": "tokens of the greedy sample written at the end",
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .config import list_presets
    from .train.config import PRECISIONS, QAT_SCHEMES, SCHEDULES, TrainConfig

    choices = {"preset": list_presets(), "schedule": SCHEDULES, "precision": PRECISIONS, "qat": QAT_SCHEMES}
    add_dataclass_flags(p, TrainConfig, TRAIN_HELP, choices, types={"device": device},
                        renames={"model_config": "--config"})
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out from its newest checkpoint, or from CHECKPOINT (a step-NNNNNNN "
                        "name or path; later checkpoints are deleted), or 'auto': continue if the run has a "
                        "checkpoint, else start it (what a run restarted by torchrun --max-restarts does "
                        "by itself). Changed --lr, --warmup-steps and other optimizer and schedule flags apply from "
                        "there and are recorded")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain a model (default: tiny preset on the Python stdlib)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import torch

    from .parallel.elastic import resolve_resume
    from .train.config import TrainConfig, resolve, resume_config
    from .train.loop import train
    from .train.state import TRAIN_CONFIG

    given = {k: v for k, v in vars(args).items() if k in TRAIN_HELP}
    cfg, model_cfg = resolve(TrainConfig(**given), torch.cuda.is_available())
    args.resume = resolve_resume(args.resume, Path(cfg.out))  # `auto`, or a restart by torchrun
    if args.resume:
        saved_path = Path(cfg.out) / TRAIN_CONFIG
        if not saved_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {str(saved_path)!r} does not exist")
        cfg, model_cfg = resolve(resume_config(TrainConfig.from_json(saved_path), given), torch.cuda.is_available())
    summary = train(cfg, model_cfg, resume=args.resume)
    if summary is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return 0
    print(f"done      {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_time_s']:.0f}s wall "
          f"({summary['step_time_s']:.0f}s in steps, {summary['tokens_per_s']:,} tok/s), "
          f"{summary['skipped_steps']} skipped")
    if summary["val_loss"] is not None:
        print(f"val       loss {summary['val_loss']:.4f}  ppl {summary['val_ppl']:.2f}  "
              f"bits/byte {summary['val_bpb']:.4f}")
    print(f"model     {summary['final']}")
    if summary["plots"]:
        print(f"plots     {', '.join(str(Path(cfg.out) / p) for p in summary['plots'])}")
    if summary["sample"]:
        print("sample    greedy, prompt 'def ':\n" + summary["sample"])
    return 0


# ---- eval ---------------------------------------------------------------------------------------------
def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss, perplexity and bits/byte of a model directory")
    add_model_arg(p)
    p.add_argument("--data", type=existing_path,
                   help="evaluate on these documents (default: the held-out split it trained on)")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--seq-len", type=at_least(1), default=None,
                   help="tokens per sequence (default: the training run's, else 256)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="sequences per forward pass")
    p.add_argument("--max-batches", type=at_least(1), default=None, help="stop after this many (default: all)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: $DEEPMOE_CACHE or ~/.cache/deepmoe)")
    add_device_dtype(p)
    p.set_defaults(func=cmd_eval)


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
    model = load_pretrained(model_dir, device=device, dtype=torch_dtype(args.dtype), load_mtp=False)
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


# ---- the command --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    import torch

    p = Parser(prog="deepmoe", description="DeepSeek-V2/V3 MoE models in compact PyTorch.")
    p.add_argument("--version", action="version", version=f"deepmoe {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_info_parser, add_convert_parser, add_generate_parser, add_train_parser, add_eval_parser,
                add_serve_parser, add_merge_parser, add_sft_parser, add_distill_parser, add_grpo_parser,
                add_quantize_parser):
        add(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_model_arg(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    from .train.async_checkpoint import CheckpointWriteError
    from .train.loop import TrainingError

    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument (already reported in one line)
        return e.code
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    # ConfigError and CheckpointError are ValueErrors; CheckpointWriteError: a background save failed
    except (FileNotFoundError, ValueError, TrainingError, CheckpointWriteError) as e:
        print(f"deepmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
