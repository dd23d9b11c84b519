"""Batch-1 greedy decode: deepmoe's engine (paged latent cache, absorbed MLA) vs transformers' generate.

Same weights (a model directory, or a random one of a preset), same prompt, same number of new tokens
(eos ignored on both sides), transformers with each experts setting of --hf-impl (see contenders.py); the
contenders alternate for --rounds rounds in one process, the median is reported, and deepmoe's ratio is
against the fastest transformers. Before timing, the greedy tokens are compared with each transformers'. A
divergence counts as an fp near-tie only if, at the first divergent position,
transformers' top-2 logits differ by less than --tie-margin (default 1e-3 in fp32, 0.25 in bf16) and
deepmoe's token is that runner-up; otherwise the script reports a real mismatch and exits 1 without timing.
A model directory with MTP weights adds a third contender: deepmoe with MTP speculative decoding, with its
acceptance rate (a random-weight MTP layer drafts badly, so that figure means something only for a
trained model).

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
    p.add_argument("--tie-margin", type=float, default=None,
                   help="largest top-2 logit gap still called a near-tie (default 1e-3 fp32, 0.25 bf16)")
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

    def hf_runner(model):
        def run() -> list[int]:
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad():  # no eos in its generation config: exactly new_tokens, no extra logits processor
                out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            assert out.shape[1] == len(prompt) + args.new_tokens
            return out[0, len(prompt):].tolist()
        return run

    theirs = {f"transformers {impl}": model for impl, model in hf.items()}
    contenders = ({name: runner(engine) for name, engine in engines.items()}
                  | {name: hf_runner(model) for name, model in theirs.items()})
    outputs = {name: fn() for name, fn in contenders.items()}
    margin = args.tie_margin if args.tie_margin is not None else (1e-3 if dtype == torch.float32 else 0.25)
    real_mismatch = False
    for name, model in {"deepmoe": ours, "deepmoe+MTP": models.drafting}.items():
        for ref, hf_model in theirs.items():
            if name in engines:
                ok, note = check_tokens(outputs[name], outputs[ref], prompt, model, hf_model, device, margin)
                print(f"greedy tokens, {name} vs {ref}: {note}")
                real_mismatch |= not ok
    if real_mismatch:
        print("real mismatch between deepmoe and transformers: not timing", file=sys.stderr)
        return 1
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name] += time_calls(fn, 1, device)
    print(f"{models.describe()}, prompt {len(prompt)}, "
          f"{args.new_tokens} new tokens, batch 1, {str(dtype).removeprefix('torch.')}")
    rate = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
    for k, r in rate.items():
        print(f"{k:<24} {r:8.1f} tok/s (median of {args.rounds}, prefill included)")
    best = max(theirs, key=rate.get)
    print(f"deepmoe / {best} (fastest transformers): {rate['deepmoe'] / rate[best]:.2f}x")
    if "deepmoe+MTP" in engines:
        e = engines["deepmoe+MTP"]
        print(f"deepmoe+MTP / {best}: {rate['deepmoe+MTP'] / rate[best]:.2f}x; "
              f"speculative speedup {rate['deepmoe+MTP'] / rate['deepmoe']:.2f}x, "
              f"acceptance {e.acceptance_rate:.1%} of {e.num_drafted} drafts")
    return 0


def check_tokens(ours: list[int], ref: list[int], prompt: list[int], model, hf, device, margin: float
                 ) -> tuple[bool, str]:
    """(acceptable, description) of deepmoe's greedy tokens against transformers'. At the first divergent
    position both models score the same prefix; the divergence is an fp near-tie only if transformers'
    top-2 logits are closer than `margin` and deepmoe picked transformers' second choice."""
    same = sum(x == y for x, y in zip(ours, ref, strict=True))
    at = next((i for i, (x, y) in enumerate(zip(ours, ref)) if x != y), None)
    if at is None:
        return True, f"{same}/{len(ref)} identical"
    ids = torch.tensor([prompt + ref[:at]], device=device)
    with torch.no_grad():
        ref_logits = hf(input_ids=ids).logits[0, -1].float()
        our_logits = model(ids)[0, -1].float()
    top = ref_logits.topk(2)
    gap = float(top.values[0] - top.values[1])
    runner_up = int(top.indices[1]) == ours[at]
    diff = float((our_logits - ref_logits).abs().max())
    near_tie = runner_up and gap < margin
    verdict = ("an fp near-tie" if near_tie else
               "a REAL MISMATCH" + ("" if runner_up else " (deepmoe's token is not transformers' runner-up)"))
    return near_tie, (f"{same}/{len(ref)} identical; first divergence at token {at}: transformers' top-2 logit "
                      f"gap {gap:.3g} vs threshold {margin:g} (max |logit difference| of the two models there "
                      f"{diff:.3g}): {verdict}")


if __name__ == "__main__":
    sys.exit(main())
