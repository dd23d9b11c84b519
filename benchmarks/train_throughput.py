"""Training throughput: deepmoe's real trainer step vs transformers' DeepseekV3ForCausalLM, same config,
weights and batches.

deepmoe's step is `Trainer.train_step` from deepmoe/train/loop.py, unchanged: fetch the next batch from
the packed dataset and copy it to the device, forward, cross-entropy (+ the sequence-balance loss when the
config's aux_loss_alpha > 0; 0 in the presets), backward, gradient clipping, AdamW (foreach on CPU, fused on
CUDA), the balancing-bias update, the per-layer load metrics and one metrics.jsonl line. The transformers
step does the same batch fetch, forward, cross-entropy, backward, clipping and AdamW; it has no balancing
bias, load metrics or log line (transformers' model has neither), so deepmoe's step does strictly more.
MTP is off for both (transformers has none). The corpus is generated text (a BPE tokenizer trained on it in
a temp dir, seconds), so no stdlib tokenization runs. The models are timed in alternating rounds in one
process, so machine noise hits both alike; the figure is the median step time.

    python benchmarks/train_throughput.py                          # CPU: tiny, 8 x 256, 2 threads, fp32
    python benchmarks/train_throughput.py --preset ref-813M --batch-size 8 --seq-len 1024   # GPU, bf16
    python benchmarks/train_throughput.py --preset wide-2048 --hf-impl      # GPU: deepmoe alone, breakdown
    python benchmarks/train_throughput.py --force-distributed --hf-impl     # distributed path at world 1 vs plain

--force-distributed adds a second deepmoe trainer that takes the distributed code path on this one process: a
1-rank process group (gloo on CPU, NCCL on CUDA), the (dp_shard, ep) = (1, 1) mesh and parallelize (which on
one rank applies no FSDP: there is nothing to shard, and its copies cost 1.2x the plain step on CPU; the plain
bf16 compute copies stay), the all-reduced step figures, counts and grad norm, the DCP checkpoints (`Trainer(..., distributed=True)`;
`torchrun --nproc-per-node 1` itself takes the plain path): the cost of the path itself. Both trainers start from the same seed, so the same weights and batches (their first losses
are checked equal), and are timed in the same alternating rounds; the line "distributed path (world 1) / plain
path" is the ratio of their median step times (issue 15's goal: <= 1.03x on ref-813M on one GPU). With one
rank ep is 1, so the expert-parallel dispatch (installed only for ep > 1) is not part of what is timed.

MFU (GPU only) = tokens/s · model FLOPs per token / peak FLOP/s, with model FLOPs per token
    6 · N + 3 · L · H · T · (d_qk + d_v)
N is the activated parameters without the embedding table (a lookup; the head is a GEMM, tied or not):
each does a multiply-add per token forward (2 FLOPs) and two backward (4). The second term is causal
attention's scores and weighted values, forward and backward. It is reported against two peaks:
726 TFLOP/s, the dense bf16 matmul rate measured on the lent H100 (PERF.md; used for the H200 too), and
989 TFLOP/s, the datasheet dense bf16 peak of the H100 SXM and the H200. `flop_terms` splits the same
sum by component, so the breakdown (benchmarks/breakdown.py; --breakdown, on by default on CUDA) can
print each component's FLOPs beside its time.

`wide-2048` (about DeepSeek-V2-Lite's layer shape: d 2048, 64 routed + 2 shared experts of 1408, 6 layers,
3.14B parameters) is the most layers that train at batch 8 x 1024 on one 80 GB GPU with fp32 weights and
AdamW state: 66.4 GiB before transients; the arithmetic is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from breakdown import format_breakdown, profile_steps, summary_line  # benchmarks/ (the script's folder is on sys.path)
from contenders import experts_implementation
from timing import time_calls

from deepmoe.checkpoint import save_pretrained
from deepmoe.config import ModelConfig
from deepmoe.data import BatchSampler
from deepmoe.stats import model_stats
from deepmoe.train.config import TrainConfig, resolve
from deepmoe.train.loop import Trainer
from deepmoe.train.losses import cross_entropy
from deepmoe.train.optim import build_optimizer

# name fragment of torch.cuda.get_device_name → (measured dense bf16 matmul, datasheet dense bf16), FLOP/s
PEAK_BF16_FLOPS = {"H100": (726e12, 989e12), "H200": (726e12, 989e12)}


PROFILED_STEPS = 2  # steps the breakdown profiles, after the timed rounds


def flop_terms(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token by the breakdown component that does them (see the module docstring)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    routed = n_moe * 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok or 0)  # activated, per token
    router = n_moe * (cfg.n_routed_experts or 0) * d
    # the embedding table is a lookup; a tied head's matrix is that table, counted once in `activated`
    head_separate = 0 if cfg.tie_word_embeddings else V * d
    dense = model_stats(cfg).activated - V * d - routed - router - head_separate
    attention = 3 * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return {"expert GEMMs": 6 * routed, "dense GEMMs": 6 * dense, "router": 6 * router, "head + loss": 6 * V * d,
            "attention": cfg.num_hidden_layers * attention}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return sum(flop_terms(cfg, seq_len).values())


def mfu_formula(cfg: ModelConfig, seq_len: int, tokens: int) -> str:
    """The MFU formula and the numbers that go into it."""
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    fpt = flops_per_token(cfg, seq_len)
    n = (fpt - flop_terms(cfg, seq_len)["attention"]) / 6
    attention = L * 3 * H * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return (f"MFU = tokens/s x model FLOPs/token / peak FLOP/s; model FLOPs/token = 6·N + 3·L·H·T·(d_qk + d_v)\n"
            f"  N = activated parameters without the embedding table = {n / 1e6:,.2f}M "
            f"(6·N = {6 * n / 1e9:.3f} GFLOP: forward 2·N, backward 4·N)\n"
            f"  3·L·H·T·(d_qk + d_v) = 3·{L}·{H}·{seq_len}·({cfg.qk_head_dim} + {cfg.v_head_dim}) = "
            f"{attention / 1e6:,.1f}M (causal attention: scores and weighted values, forward and backward)\n"
            f"  = {fpt / 1e9:.3f} GFLOP/token; x {tokens:,} tokens = {fpt * tokens / 1e12:.2f} TFLOP/step")


def write_corpus(root: Path, n_docs: int = 40, words_per_doc: int = 25_000) -> Path:
    """Deterministic word salad: enough tokens for many (B, T) batches at any preset's seq_len."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)]
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(n_docs):
        (corpus / f"doc{i:03d}.txt").write_text(" ".join(rng.choices(words, k=words_per_doc)))
    return corpus


def make_steps(args, device: torch.device, tmp: Path):
    """(name, step function) for deepmoe's trainer and each requested transformers implementation, and
    the deepmoe Trainer (for its config)."""
    import transformers

    cfg, model_cfg = resolve(TrainConfig(
        preset=args.preset, data=str(write_corpus(tmp)), cache_dir=str(tmp / "cache"), out=str(tmp / "run"),
        device=str(device), seq_len=args.seq_len, batch_size=args.batch_size, steps=10**9, warmup_steps=0,
        lr=1e-4, progress=False, plots=False, sample_tokens=0, precision=args.precision, compile=args.compile),
        torch.cuda.is_available())
    trainer = Trainer(cfg, model_cfg.replace(num_nextn_predict_layers=0))
    steps = [("deepmoe Trainer.train_step", trainer.train_step)]
    if args.force_distributed:
        steps.append((DISTRIBUTED, distributed_trainer(cfg, model_cfg, tmp).train_step))
    if args.hf_impl:
        save_pretrained(trainer.model, tmp / "weights")  # same weights for transformers
    data = trainer.data.train
    for impl in args.hf_impl:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp / "weights", dtype=torch.float32, **experts_implementation(impl, device)).to(device).train()
        hf_opt = build_optimizer(hf, cfg)
        sampler = BatchSampler(len(data), cfg.batch_size, cfg.seed)  # the trainer's batches, in its order

        def hf_step(hf=hf, hf_opt=hf_opt, sampler=sampler) -> torch.Tensor:
            x, y = data.batch(next(sampler))
            x, y = x.to(device), y.to(device)
            with trainer.autocast or contextlib.nullcontext():
                loss = cross_entropy(hf(input_ids=x).logits, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip, foreach=True)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
            return loss.detach()

        steps.append((f"transformers {impl}", hf_step))
    return steps, trainer


DISTRIBUTED = "deepmoe distributed, world 1"


def distributed_trainer(cfg: TrainConfig, model_cfg: ModelConfig, tmp: Path) -> Trainer:
    """The same trainer on the distributed path in a process group of this one process (see the docstring)."""
    import socket

    with socket.socket() as s:  # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    return Trainer(dataclasses.replace(cfg, out=str(tmp / "run-distributed")), model_cfg.replace(num_nextn_predict_layers=0), distributed=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="default: tiny on CPU, ref-813M on CUDA")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: 256 on CPU, 1024 on CUDA")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp8"],
                   help="deepmoe's precision (auto: bf16 on CUDA, fp32 on CPU); the reference keeps autocast or fp32")
    p.add_argument("--compile", action="store_true", help="deepmoe's blocks compiled (deepmoe train --compile)")
    p.add_argument("--hf-impl", nargs="*", default=["eager", "grouped_mm"],
                   help="transformers experts_implementation values to compare with (none: time deepmoe alone)")
    p.add_argument("--force-distributed", action="store_true",
                   help="also time the distributed code path (FSDP2, a 1-rank process group) against the plain path")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                   help=f"after the timed rounds, profile {PROFILED_STEPS} deepmoe steps and print where the time "
                        "goes (default: on CUDA only)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.breakdown is None:
        args.breakdown = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.preset = args.preset or ("ref-813M" if device.type == "cuda" else "tiny")
    args.seq_len = args.seq_len or (1024 if device.type == "cuda" else 256)

    with tempfile.TemporaryDirectory() as tmp:
        steps, trainer = make_steps(args, device, Path(tmp))
        cfg = trainer.model_cfg
        # same weights, same first batch: same first loss (the trainer's "ce" excludes its balance loss)
        first = {name: float(step()["ce"] if name.startswith("deepmoe") else step()) for name, step in steps}
        ref = first[steps[0][0]]
        precision = {"fp8": "fp8 GEMMs + bf16"}.get(trainer.cfg.precision, "bf16 compute weights + autocast"
                                                         if trainer.autocast is not None else "fp32")
        precision += ", compiled blocks" if trainer.cfg.compile else ""
        where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"cpu ({torch.get_num_threads()} threads)")
        print(f"device {where}, torch {torch.__version__}, {args.preset} ({cfg.num_hidden_layers} layers, MTP off), "
              f"batch {args.batch_size} x "
              f"{args.seq_len}, {precision}; deepmoe aux_loss_alpha {trainer.cfg.aux_loss_alpha}, bias update "
              f"rate {trainer.cfg.bias_update_rate}")
        print("first-step loss: " + ", ".join(f"{n} {v:.5f}" for n, v in first.items()))
        tol = 2e-2 if device.type == "cuda" else 1e-4
        if any(abs(v - ref) > tol * abs(ref) for v in first.values()):
            print("loss mismatch between implementations: not timing", file=sys.stderr)
            return 1
        for name, step in steps:
            time_calls(step, args.warmup, device)
        times: dict[str, list[float]] = {name: [] for name, _ in steps}
        peak_mem: dict[str, int] = {}
        for _ in range(args.rounds):  # alternate, so drifting machine load affects every model alike
            for name, step in steps:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[name] += time_calls(step, args.steps, device)
                if device.type == "cuda":
                    peak_mem[name] = max(peak_mem.get(name, 0), torch.cuda.max_memory_allocated(device))
        breakdown = profile_steps(trainer.train_step, trainer.model, PROFILED_STEPS, device) if args.breakdown else None
        for name, step in steps:
            if name.startswith("deepmoe"):
                step.__self__.metrics.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    tokens = args.batch_size * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    peaks = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in where), None)
    rates = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rates[name] = tokens / med
        line = f"{name:<26} {rates[name]:>10,.0f} tok/s  {med * 1e3:8.1f} ms/step (median of {len(ts)})"
        if peaks:
            line += (f"  MFU {rates[name] * fpt / peaks[0]:.1%} of {peaks[0] / 1e12:.0f} (measured), "
                     f"{rates[name] * fpt / peaks[1]:.1%} of {peaks[1] / 1e12:.0f} TFLOP/s (datasheet)")
        if name in peak_mem:  # both models stay resident, so this includes the other's weights and state
            line += f"  peak mem {peak_mem[name] / 2**30:.1f} GiB"
        print(line)
    ours = steps[0][0]
    if DISTRIBUTED in rates:
        print(f"distributed path (world 1) / plain path, median step time: {rates[ours] / rates[DISTRIBUTED]:.3f}x "
              f"(goal <= 1.03x)")
    refs = [(v, n) for n, v in rates.items() if n.startswith("transformers")]
    if refs:
        best_ref = max(refs)
        print(f"deepmoe / {best_ref[1]} (fastest transformers): {rates[ours] / best_ref[0]:.2f}x")
    print(mfu_formula(cfg, args.seq_len, tokens))
    if peaks:
        print(f"  peak: {peaks[0] / 1e12:.0f} TFLOP/s (dense bf16 matmul measured on the H100) and "
              f"{peaks[1] / 1e12:.0f} TFLOP/s (datasheet dense bf16)")
    else:
        print(f"  no peak known for {where}: deepmoe did {rates[ours] * fpt / 1e9:,.1f} GFLOP/s")
    if breakdown is not None:
        flops = {k: v * tokens for k, v in flop_terms(cfg, args.seq_len).items()}
        print(format_breakdown(breakdown, flops, statistics.median(times[ours]) * 1e3))
        print(summary_line(breakdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
