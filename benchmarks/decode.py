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
import tempfile

import torch
from timing import time_calls  # benchmarks/timing.py (the script's folder is on sys.path)

from deepmoe.checkpoint import save_pretrained
from deepmoe.config import ModelConfig
from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.model import build_model
from deepmoe.tokenizer import load_tokenizer, train_bpe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model directory (default: random weights of --preset)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens (without --prompt)")
    p.add_argument("--prompt", help="a text prompt, encoded with the model directory's tokenizer")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hf-impl", default="eager", help="transformers experts_implementation")
    args = p.parse_args(argv)
    import transformers

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            cfg = ModelConfig.from_preset(args.preset).replace(num_nextn_predict_layers=0)
            save_pretrained(build_model(cfg, seed=0), tmp)
            path = tmp
        from deepmoe.checkpoint import load_pretrained

        ours = load_pretrained(path, device=device, dtype=dtype, load_mtp=False)
        drafting = load_pretrained(path, device=device, dtype=dtype) if args.model else None
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                               experts_implementation=args.hf_impl).to(device).eval()
    # the engine needs a tokenizer for eos/decoding only; eos is ignored here
    tok = load_tokenizer(args.model) if args.model else train_bpe(["x"], 300)
    engines = {"deepmoe": LLMEngine(ours, tok, kv_cache_bytes=64 * 2**20, block_size=16, max_num_seqs=1)}
    if drafting is not None and len(drafting.mtp):
        engines["deepmoe+MTP"] = LLMEngine(drafting, tok, kv_cache_bytes=64 * 2**20, block_size=16, max_num_seqs=1,
                                           speculative=True)
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
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {where}, {path if args.model else args.preset + ' (random weights)'}, prompt {len(prompt)}, "
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
