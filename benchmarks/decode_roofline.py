"""Batch-1 greedy decode against the memory roofline: tokens/s, bytes read per token, and the fraction of
the device's measured copy bandwidth that rate implies.

At batch 1 a decode step must read every weight a token activates (the attention and dense parts, the
shared experts, its k routed experts, the head; one row of the embedding) plus its latent history, so
tokens/s × bytes/token ≤ bandwidth. The model is built with random weights directly on the device in the
compute dtype (no checkpoint on disk: the DeepSeek-V2-Lite shape is 31 GB in bf16). Random weights route
tokens as a trained model would not, but every token still reads k experts per layer, so the bytes per
token are the same. No transformers side here: benchmarks/decode.py compares against it on ref-813M.

    python benchmarks/decode_roofline.py --preset deepseek-v2-lite --device cuda     # the GPU figure
    python benchmarks/decode_roofline.py                                              # tiny on the CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from timing import time_calls

from deepmoe.config import ModelConfig
from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.model import build_model
from deepmoe.stats import model_stats
from deepmoe.tokenizer import train_bpe


def copy_bandwidth(device: torch.device, nbytes: int, rounds: int = 5) -> float:
    """Bytes/s a device-to-device copy moves, counting the read and the write (the usual convention)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = time_calls(lambda: dst.copy_(src), rounds, device)
    return 2 * nbytes / statistics.median(times)


def bytes_per_token(cfg: ModelConfig, itemsize: int, context: int) -> int:
    """Weights one batch-1 decode token reads (one embedding row, not the table) plus its latent history."""
    s = model_stats(cfg, torch.bfloat16)
    weights = s.activated - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    if cfg.tie_word_embeddings:  # the tied head is the embedding, read whole by the head
        weights += cfg.vocab_size * cfg.hidden_size
    kv = s.kv_latent_bytes // 2 * itemsize * context
    return weights * itemsize + kv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = ModelConfig.from_preset(args.preset).replace(num_nextn_predict_layers=0)
    model = build_model(cfg, device=device, dtype=dtype, seed=0)
    engine = LLMEngine(model, train_bpe(["x"], 300), kv_cache_bytes=256 * 2**20, block_size=16, max_num_seqs=1,
                       cuda_graphs=not args.no_cuda_graphs)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)

    def decode_only() -> float:
        """Seconds per token of the decode steps alone (the prompt's prefill is not a decode step)."""
        engine.blocks.reset_prefix_cache()
        engine.add(prompt, params, "bench")
        engine.step()  # prefill and the first token
        steps = time_calls(lambda: engine.step(), args.new_tokens - 1, device)
        while engine.scheduler.has_unfinished():
            engine.step()
        return statistics.median(steps)

    decode_only()  # warm-up
    per_token = statistics.median(decode_only() for _ in range(args.rounds))
    rate = 1 / per_token
    context = args.prompt_len + args.new_tokens // 2
    nbytes = bytes_per_token(cfg, dtype.itemsize, context)
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**28)
    roofline = bandwidth / nbytes
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    graphs = engine.runner.decoder is not None and engine.runner.decoder.mode == "graphs"
    print(f"device {where}, {args.preset} (random weights, {str(dtype).removeprefix('torch.')}), batch 1, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, CUDA graphs {'on' if graphs else 'off'}")
    print(f"decode          {rate:10.1f} tok/s (median step of the decode phase, median of {args.rounds} rounds)")
    print(f"bytes/token     {nbytes / 1e9:10.3f} GB (activated weights + latent history at context {context})")
    print(f"copy bandwidth  {bandwidth / 1e12:10.3f} TB/s (device-to-device copy, read + write)")
    print(f"roofline        {roofline:10.1f} tok/s; decode reaches {rate / roofline:.1%} of it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tok_s": rate, "bytes_per_token": nbytes, "copy_bandwidth": bandwidth,
                       "roofline_tok_s": roofline, "fraction": rate / roofline, "device": where}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
