"""Batch-1 greedy decode: deepmoe's engine (paged latent cache, absorbed MLA) vs transformers' generate.

Same weights (a model directory, or a random one of a preset), same prompt, same number of new tokens
(eos ignored); the contenders alternate for --rounds rounds in one process and the median is reported.
Before timing, the greedy tokens are compared. A model directory with MTP weights adds a third contender:
deepmoe with MTP speculative decoding, with its acceptance rate (a random-weight MTP layer drafts badly,
so that figure means something only for a trained model).

    python benchmarks/decode.py                              # tiny, random weights, CPU, 2 threads
    python benchmarks/decode.py --model runs/tiny/final --prompt "import os"
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from contenders import add_model_args, load_contenders  # benchmarks/ (the script's folder is on sys.path)
from timing import time_calls

from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.tokenizer import load_tokenizer, train_bpe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens (without --prompt)")
    p.add_argument("--prompt", help="a text prompt, encoded with the model directory's tokenizer")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    models = load_contenders(args, with_mtp=True)
    device, dtype, ours, hf = models.device, models.dtype, models.ours, models.hf
    # the engine needs a tokenizer for eos/decoding only; eos is ignored here
    tok = load_tokenizer(args.model) if args.model else train_bpe(["x"], 300)
    batch1 = dict(kv_cache_bytes=64 * 2**20, block_size=16, max_num_seqs=1)
    engines = {"deepmoe": LLMEngine(ours, tok, **batch1)}
    if models.drafting is not None:
        engines["deepmoe+MTP"] = LLMEngine(models.drafting, tok, speculative=True, **batch1)
    torch.manual_seed(0)
    if args.prompt:
        prompt = tok.encode(args.prompt)
    else:
        prompt = torch.randint(3, ours.config.vocab_size, (args.prompt_len,)).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)

    def runner(engine):
        def run() -> list[int]:
            engine.blocks.reset_prefix_cache()  # every run prefills the whole prompt, as transformers does
            seq = engine.add(prompt, params, "bench")
            while engine.scheduler.has_unfinished():
                engine.step()
            return seq.completion_token_ids
        return run

    def run_hf() -> list[int]:
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=0)
        return out[0, len(prompt):].tolist()

    contenders = {name: runner(engine) for name, engine in engines.items()} | {"transformers": run_hf}
    outputs = {name: fn() for name, fn in contenders.items()}
    for name in contenders:
        if name != "transformers":
            same = sum(x == y for x, y in zip(outputs[name], outputs["transformers"]))
            note = "" if same == args.new_tokens else " (diverged: fp rounding on a near-tie)"
            print(f"greedy tokens identical, {name} vs transformers: {same}/{args.new_tokens}{note}")
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name] += time_calls(fn, 1, device)
    print(f"{models.describe()}, prompt {len(prompt)}, "
          f"{args.new_tokens} new tokens, batch 1, {str(dtype).removeprefix('torch.')}")
    rate = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
    for k, r in rate.items():
        print(f"{k:<14} {r:8.1f} tok/s (median of {args.rounds}, prefill included)")
    print(f"deepmoe / transformers {args.hf_impl}: {rate['deepmoe'] / rate['transformers']:.2f}x")
    if "deepmoe+MTP" in engines:
        e = engines["deepmoe+MTP"]
        print(f"deepmoe+MTP / transformers: {rate['deepmoe+MTP'] / rate['transformers']:.2f}x; "
              f"speculative speedup {rate['deepmoe+MTP'] / rate['deepmoe']:.2f}x, "
              f"acceptance {e.acceptance_rate:.1%} of {e.num_drafted} drafts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
