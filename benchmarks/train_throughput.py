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

MFU (GPU only) = model FLOPs / step time / peak, with model FLOPs per token
    6 · (activated parameters − embedding) + 3 · L · H · T · (d_qk + d_v)
(the second term: causal attention scores and weighted values, forward and backward), reported against
two peaks: 726 TFLOP/s, the dense bf16 matmul rate measured on the lent H100 (PERF.md; used for the H200
too), and 989 TFLOP/s, the datasheet dense bf16 peak of the H100 SXM and the H200.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from contenders import experts_implementation  # benchmarks/ (the script's folder is on sys.path)
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


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    matmul_params = model_stats(cfg).activated - cfg.vocab_size * cfg.hidden_size
    attention = 3 * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * matmul_params + cfg.num_hidden_layers * attention


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
        lr=1e-4, progress=False, plots=False, sample_tokens=0), torch.cuda.is_available())
    trainer = Trainer(cfg, model_cfg.replace(num_nextn_predict_layers=0))
    steps = [("deepmoe Trainer.train_step", trainer.train_step)]
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
    p.add_argument("--hf-impl", nargs="+", default=["eager", "grouped_mm"],
                   help="transformers experts_implementation values to compare with")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        precision = "bf16 autocast" if trainer.autocast is not None else "fp32"
        where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"cpu ({torch.get_num_threads()} threads)")
        print(f"device {where}, torch {torch.__version__}, {args.preset} (MTP off), batch {args.batch_size} x "
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
        trainer.metrics.close()
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
    best_ref = max((v, n) for n, v in rates.items() if n != ours)
    print(f"deepmoe / {best_ref[1]} (fastest transformers): {rates[ours] / best_ref[0]:.2f}x")
    print(f"model FLOPs/token {fpt / 1e6:.1f}M (6·N_active_matmul + causal attention)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
