"""LoRA vs full fine-tuning: trainable parameters, peak memory and step time of the same training step.

Each mode runs in a fresh process (peak memory is per process): build the model, optionally cast the base
to bf16, apply LoRA (or not), then `steps` optimizer steps of forward, cross-entropy, backward and AdamW
(deepmoe's build_optimizer: only parameters that require grad, foreach on CPU). Memory on CPU is the peak
resident set size (ru_maxrss) of the process, and the part above the resident size once the model is built
("training overhead": gradients, optimizer state, activations); on CUDA, torch's peak allocated bytes.
MTP is off (an adapter never touches the MTP modules).

    python benchmarks/lora_memory.py                       # tiny preset and a ~100M-parameter MoE, CPU
    python benchmarks/lora_memory.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = {
    "full fine-tuning": dict(lora=None),
    "LoRA r16 all-linear": dict(lora=("all-linear",)),
    "LoRA r16 all-linear + experts": dict(lora=("all-linear", "experts")),
    "LoRA r16 all-linear + experts, bf16 base": dict(lora=("all-linear", "experts"), bf16=True),
}
SIZES = {  # tiny: the shipped preset; moe-100m: the same shape scaled so the experts dominate, as at scale
    "tiny": dict(preset="tiny"),
    "moe-100m": dict(preset="tiny", hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                     n_routed_experts=32, num_hidden_layers=8, q_lora_rank=192, kv_lora_rank=128,
                     num_attention_heads=8),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(size: str, mode: str, steps: int, batch: int, seq_len: int, rank: int) -> dict:
    import torch

    from deepmoe.config import ModelConfig
    from deepmoe.lora import LoraConfig, apply_lora, trainable_parameters
    from deepmoe.model import build_model
    from deepmoe.train.config import TrainConfig
    from deepmoe.train.losses import cross_entropy
    from deepmoe.train.optim import build_optimizer

    torch.manual_seed(0)
    spec, opts = dict(SIZES[size]), MODES[mode]
    cfg = ModelConfig.from_preset(spec.pop("preset")).replace(num_nextn_predict_layers=0, **spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg, device=device, dtype=torch.bfloat16 if opts.get("bf16") else torch.float32)
    base_params = trainable_parameters(model)[1]
    if opts["lora"]:
        apply_lora(model, LoraConfig(rank=rank, targets=opts["lora"]))
    trainable, _ = trainable_parameters(model)
    model.train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, warmup_steps=1, steps=steps))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device) for _ in range(steps)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    times = []
    for ids in batches:
        t0 = time.perf_counter()
        loss = cross_entropy(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        what = "CUDA peak allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        what = "peak RSS"
    return {"size": size, "mode": mode, "base_parameters": base_params, "trainable": trainable,
            "trainable_pct": 100 * trainable / base_params, "peak_bytes": peak, "overhead_bytes": peak - before,
            "memory": what, "step_s": min(times), "loss": loss.item(), "device": device}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.steps, args.batch_size, args.seq_len, args.rank)))
        return
    rows = []
    for size in args.sizes:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--one", size, mode, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--seq-len", str(args.seq_len), "--rank", str(args.rank)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{size:9} {mode:42} trainable {r['trainable']:>12,} ({r['trainable_pct']:6.2f}%)  "
                  f"{r['memory']} {r['peak_bytes'] / 2**20:7.0f} MiB  overhead {r['overhead_bytes'] / 2**20:7.0f} MiB"
                  f"  fastest step {r['step_s']:.2f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
