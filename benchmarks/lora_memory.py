"""LoRA vs full fine-tuning: peak memory of the same `deepmoe sft` steps, on the same model and batches.

The parent writes one base model directory per size (a preset, optionally resized, with a small BPE
tokenizer) and one prompt/completion JSONL whose every example fills seq_len, then runs each mode in a
fresh process, since peak memory is per process: SFTTrainer on that base and data (one seed, so the same
batches in every mode), then `steps` optimizer steps. Memory is measured over the steps alone, from a
high-water mark reset once the trainer is built:
  - CPU: peak resident set size (getrusage ru_maxrss), reset through /proc/self/clear_refs. Where the
    kernel refuses, the figure is the process's lifetime peak (model loading included) and says so;
  - CUDA: torch.cuda.max_memory_allocated, reset with reset_peak_memory_stats.
"above start" is that peak minus what the process held when the steps began (the weights, the data):
gradients, AdamW state, activations. "grads+AdamW" is the exact size of the first two
(deepmoe.posttrain.footprint), the part LoRA removes; activations stay, as the base still runs forward
and backward.

    python benchmarks/lora_memory.py --sizes tiny --steps 2 --seq-len 128     # about a minute on 2 CPU cores
    python benchmarks/lora_memory.py --json rows.json                        # tiny and a ~100M-parameter MoE
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {  # mode → LoRA targets (None: full fine-tuning)
    "full fine-tuning": None,
    "LoRA all-linear": "all-linear",
    "LoRA all-linear,experts": "all-linear,experts",
}
SIZES = {  # tiny: the shipped preset; moe-100m: the same shape scaled so the experts dominate, as at scale
    "tiny": dict(preset="tiny"),
    "moe-100m": dict(preset="tiny", hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                     n_routed_experts=32, num_hidden_layers=8, q_lora_rank=192, kv_lora_rank=128,
                     num_attention_heads=8),
}
WORDS = "the of and to in is was for on that with as by at from it an be are this which or had not".split()


# ---- the parent: one base and one data file, then one child process per mode ----------------------------
def write_base(size: str, path: Path) -> None:
    from deepmoe.checkpoint import save_pretrained
    from deepmoe.config import ModelConfig
    from deepmoe.model import build_model
    from deepmoe.tokenizer import train_bpe

    spec = dict(SIZES[size])
    save_pretrained(build_model(ModelConfig.from_preset(spec.pop("preset")).replace(**spec), seed=0), path)
    train_bpe(sentences(400, 0), 300).save(path)


def sentences(n: int, seed: int, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


def write_data(path: Path, n: int, seq_len: int) -> None:
    """n prompt/completion records, each longer than seq_len tokens: every row of every batch is full."""
    with open(path, "w") as f:
        for i, text in enumerate(sentences(n, 1, words=2 * seq_len)):
            f.write(json.dumps({"prompt": f"Example {i}: ", "completion": text}) + "\n")


# ---- a child: one mode --------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the resident-set high-water mark that ru_maxrss reports
        return True
    except OSError:
        return False


def run_one(mode: str, model: str, data: str, out: str, steps: int, batch: int, seq_len: int, rank: int) -> dict:
    import torch

    from deepmoe.posttrain.config import SFTConfig, resolve
    from deepmoe.posttrain.footprint import footprint
    from deepmoe.posttrain.sft import SFTTrainer

    targets = MODES[mode]
    lora = {} if targets is None else dict(lora_rank=rank, lora_targets=targets)
    cfg = SFTConfig(model=model, data=data, out=out, val_fraction=0.0, eval_problems=0, batch_size=batch,
                    seq_len=seq_len, steps=steps, warmup_steps=1, lr=1e-4, plots=False, progress=False, **lora)
    trainer = SFTTrainer(resolve(cfg, torch.cuda.is_available()))
    sizes = footprint(trainer.model)
    cuda = trainer.device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, reset = torch.cuda.memory_allocated(), True
    else:
        start, reset = rss_bytes(), reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        record = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        # a skipped step allocates no AdamW state: the figure would flatter the mode
        assert not record["skipped"], f"{mode}: step {record['step']} was skipped (non-finite loss)"
        assert record["pad_fraction"] == 0.0, "the batches should be full rows"
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.metrics.close()
    return {"mode": mode, "device": str(trainer.device), **sizes, "start_bytes": start, "peak_bytes": peak,
            "peak_is_steps_only": reset, "step_s": min(times), "loss": record["loss"]}


# ---- the table ----------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def print_table(size: str, rows: list[dict]) -> None:
    full = next(r for r in rows if r["mode"] == "full fine-tuning")
    what = "CUDA peak allocated" if rows[0]["device"].startswith("cuda") else "peak RSS"
    if not all(r["peak_is_steps_only"] for r in rows):
        what += " (lifetime: the kernel refused the reset)"
    print(f"\n{size}: {full['parameters']:,} parameters; {what} over the steps, MiB")
    print(f"{'mode':<26}{'trainable':>22}{'grads+AdamW':>13}{'peak':>10}{'above start':>13}"
          f"{'peak vs full':>14}{'above start vs full':>21}{'step s':>8}")
    for r in rows:
        above, full_above = r["peak_bytes"] - r["start_bytes"], full["peak_bytes"] - full["start_bytes"]
        trained = f"{r['trainable_parameters']:,} ({100 * r['trainable_fraction']:.2f}%)"
        print(f"{r['mode']:<26}{trained:>22}{mib(r['grad_bytes'] + r['optimizer_state_bytes']):>13}"
              f"{mib(r['peak_bytes']):>10}{mib(above):>13}{r['peak_bytes'] / full['peak_bytes']:>13.2f}x"
              f"{above / full_above:>20.2f}x{r['step_s']:>8.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps measured per mode")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one", nargs=4, metavar=("MODE", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)  # a child
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.steps, args.batch_size, args.seq_len, args.rank)))
        return
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        write_data(data, args.batch_size * args.steps, args.seq_len)
        for size in args.sizes:
            base = Path(tmp) / size
            write_base(size, base)
            rows = []
            for mode in MODES:
                cmd = [sys.executable, __file__, "--one", mode, str(base), str(data), str(Path(tmp) / f"{size}-{mode}"),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
                       str(args.seq_len), "--rank", str(args.rank)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append({"size": size, **json.loads(out.strip().splitlines()[-1])})
            print_table(size, rows)
            all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=2)


if __name__ == "__main__":
    main()
