"""GRPO rollout throughput: deepmoe's RolloutEngine vs transformers' sampling `generate`, same weights and work.

One rollout batch is what `deepmoe grpo` samples per step: G completions of each of P prompts, at temperature
1, here exactly N new tokens each (eos ignored on both sides). deepmoe runs `RolloutEngine.generate` (the
engine on its own copy of the weights, in the serving dtype; the G copies of a prompt share its cached
prefix); transformers runs `generate(do_sample=True, temperature=1.0, top_k=0, num_return_sequences=G,
min_new_tokens=N, max_new_tokens=N)` on all P prompts as one batch (top_k=0: no top-k filter, as on
deepmoe's side, instead of transformers' default of 50). Prompts are P random token ids of --prompt-len,
or the first P training prompts of a task (--task; different lengths, left-padded with an attention mask
on transformers' side). Same weights (a model directory, or random weights of a preset), transformers with
each experts setting of --hf-impl (contenders.py); bf16 on CUDA, fp32 on CPU. The contenders alternate for
--rounds rounds in one process, the median is reported as generated tokens/s (P*G*N per batch), and
deepmoe's ratio is against the fastest transformers. Sampled tokens are not compared; instead every batch
must hold P*G completions of exactly N tokens each (and, with --logprobs, N log-probabilities each), or
the script exits 1. --logprobs asks both sides for the sampled tokens' log-probabilities as GRPO does at
temperature 1 (transformers: `output_scores` + `compute_transition_scores`). The prefix cache is emptied
before every deepmoe batch (a GRPO step brings new prompts). Only the rollout is timed: the weight sync
that precedes it in training (`RolloutEngine.sync`) is timed once and printed as a note.

    python benchmarks/rollout.py                              # tiny, random weights, CPU, 2 threads
    python benchmarks/rollout.py --device cuda --preset ref-813M --new-tokens 256
    python benchmarks/rollout.py --model runs/sft/final --task arithmetic
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from contenders import add_model_args, load_contenders  # benchmarks/ (the script's folder is on sys.path)
from timing import time_calls

from deepmoe.engine.sequence import SamplingParams
from deepmoe.posttrain.rollout import RolloutEngine
from deepmoe.tokenizer import load_tokenizer, train_bpe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per rollout batch")
    p.add_argument("--generations", type=int, default=8, help="G: completions sampled per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="N: tokens per completion (eos ignored)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens (without --task)")
    p.add_argument("--task", help="prompts from a task's training problems instead, e.g. arithmetic")
    p.add_argument("--logprobs", action="store_true",
                   help="both sides also return the sampled tokens' log-probabilities (what GRPO asks for)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    P, G, N = args.prompts, args.generations, args.new_tokens
    models = load_contenders(args)
    device, dtype, ours, hf = models.device, models.dtype, models.ours, models.hf
    vocab = ours.config.vocab_size
    if args.task:
        from deepmoe.posttrain.grpo import task_prompts
        from deepmoe.tasks import get_task

        task = get_task(args.task)
        # random weights: any tokenizer within the model's vocabulary will do (train_bpe brings a chat template)
        tok = (load_tokenizer(args.model) if args.model else
               train_bpe((q.question for q in task.problems("train", 200, 0)), min(vocab, 1024)))
        prompts = task_prompts(task, tok, P, seed=0).ids
        what = f"{args.task} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
    else:
        tok = load_tokenizer(args.model) if args.model else train_bpe(["x"], 300)  # for eos/decoding only
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (P, args.prompt_len), generator=g).tolist()
        what = f"random prompts of {args.prompt_len} tokens"
    if len(prompts) < P:
        print(f"{args.task} gives {len(prompts)} prompts, fewer than --prompts {P}", file=sys.stderr)
        return 1
    longest = max(map(len, prompts))
    rollout = RolloutEngine(ours, tok, dtype, max_num_seqs=P * G, max_num_batched_tokens=max(4096, longest + N))
    params = SamplingParams(temperature=1.0, max_tokens=N, ignore_eos=True)
    # transformers' batch: left-padded to the longest prompt (no padding at all with random prompts)
    ids = torch.zeros(P, longest, dtype=torch.long)
    mask = torch.zeros(P, longest, dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, longest - len(row):] = torch.tensor(row)
        mask[i, longest - len(row):] = 1
    ids, mask = ids.to(device), mask.to(device)
    calls = iter(range(1, 10**9))  # each batch samples anew, as successive GRPO steps do

    def ours_run() -> list[tuple[tuple[int, ...], int | None]]:
        rollout.engine.blocks.reset_prefix_cache()  # every batch prefills its prompts, as transformers does
        c = next(calls)
        groups = rollout.generate(prompts, G, params, seeds=[(c * P + i) * 64 for i in range(P)],
                                  want_logprobs=args.logprobs)
        return [(tuple(r.token_ids), None if r.logprobs is None else len(r.logprobs)) for grp in groups for r in grp]

    def hf_runner(model):
        def run() -> list[tuple[tuple[int, ...], int | None]]:
            torch.manual_seed(next(calls))
            with torch.no_grad():  # no eos in its generation config (contenders.py): min_new_tokens adds nothing
                out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     num_return_sequences=G, min_new_tokens=N, max_new_tokens=N, pad_token_id=0,
                                     return_dict_in_generate=True, output_scores=args.logprobs)
                seqs = out.sequences
                lps = (model.compute_transition_scores(seqs, out.scores, normalize_logits=True)
                       if args.logprobs else None)
            n_lps = None if lps is None else lps.shape[1]
            return [(tuple(row), n_lps) for row in seqs[:, longest:].tolist()]  # GRPO needs the tokens on the host
        return run

    theirs = {f"transformers {impl}": model for impl, model in hf.items()}
    contenders = {"deepmoe": ours_run} | {name: hf_runner(model) for name, model in theirs.items()}
    wrong = False
    for name, fn in contenders.items():  # the check doubles as the warm-up
        got = fn()
        ok = len(got) == P * G and all(len(t) == N and k == (N if args.logprobs else None) for t, k in got)
        # a sanity note, not a check: at temperature 1 the completions should (almost) all differ
        print(f"{name}: {len(got)} completions, {sorted({len(t) for t, _ in got})} new tokens each"
              + (f", {sorted({k for _, k in got})} log-probs each" if args.logprobs else "")
              + f", {len(set(t for t, _ in got))} distinct"
              + ("" if ok else f": WRONG, expected {P * G} completions of {N} tokens"))
        wrong |= not ok
    if wrong:
        print("a contender did not produce P*G completions of N tokens: not timing", file=sys.stderr)
        return 1
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name] += time_calls(fn, 1, device)
    # after timing (the engine's copy gets the same values back); synchronised, unlike sync's own clock
    sync_s = time_calls(lambda: rollout.sync(ours), 1, device)[0]
    print(f"{models.describe()}, {what}, P {P} prompts x G {G} generations x N {N} new tokens, temperature 1"
          f"{', with log-probs' if args.logprobs else ''}, {str(dtype).removeprefix('torch.')}")
    total = P * G * N
    rate = {k: total / statistics.median(v) for k, v in times.items()}
    for k, r in rate.items():
        print(f"{k:<24} {r:9.1f} tok/s (median of {args.rounds} batches of {total} tokens, prefill included)")
    print(f"note: RolloutEngine.sync (policy weights into the rollout copy, not part of the times above): "
          f"{sync_s * 1e3:.1f} ms, timed once, from {str(dtype).removeprefix('torch.')} weights")
    best = max(theirs, key=rate.get)
    print(f"deepmoe / {best} (fastest transformers): {rate['deepmoe'] / rate[best]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
