"""Training throughput: deepmoe vs transformers' DeepseekV3ForCausalLM, same config, weights and batch.

One training step = forward, next-token cross-entropy, backward, gradient clipping, AdamW step (foreach
on CPU, fused on CUDA), for both. deepmoe's step also moves the routers' balancing bias, as its trainer
does. MTP is off for both (transformers has none). The two models are timed in alternating rounds in one
process, so machine noise hits both alike; the figure is the median step time.

    python benchmarks/train_throughput.py                          # CPU: tiny, 8 x 256, 2 threads, fp32
    python benchmarks/train_throughput.py --preset ref-813M --batch-size 8 --seq-len 1024   # GPU, bf16

MFU (GPU only) = model FLOPs / step time / peak, with model FLOPs per token
    6 · (activated parameters − embedding) + 3 · L · H · T · (d_qk + d_v)
(the second term: causal attention scores and weighted values, forward and backward).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile

import torch
from timing import time_calls  # benchmarks/timing.py (the script's folder is on sys.path)

from deepmoe.checkpoint import save_pretrained
from deepmoe.config import ModelConfig
from deepmoe.model import build_model
from deepmoe.stats import model_stats
from deepmoe.train.balance import expert_counts, moe_layers, update_bias
from deepmoe.train.config import TrainConfig
from deepmoe.train.losses import cross_entropy
from deepmoe.train.optim import build_optimizer

PEAK_BF16_FLOPS = {"H100": 726e12, "H200": 726e12}  # dense bf16 matmul measured on the lent GPUs (PERF.md)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    matmul_params = model_stats(cfg).activated - cfg.vocab_size * cfg.hidden_size
    attention = 3 * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * matmul_params + cfg.num_hidden_layers * attention


def make_steps(args, cfg: ModelConfig, device: torch.device):
    """(name, step function, first loss) for deepmoe and each requested transformers implementation."""
    import transformers

    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt_cfg = TrainConfig(lr=1e-4, steps=1, warmup_steps=0)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())

    ours = build_model(cfg, device=device, dtype=torch.float32, seed=0).train()
    ours_opt = build_optimizer(ours, opt_cfg)
    layers = moe_layers(ours)

    def ours_step() -> torch.Tensor:
        router_out = []
        with autocast:
            loss = cross_entropy(ours.lm_head(ours.hidden_states(x, router_out=router_out)), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0, foreach=True)
        ours_opt.step()
        update_bias(layers, expert_counts(router_out, cfg.n_routed_experts), 1e-3)
        ours_opt.zero_grad(set_to_none=True)
        return loss.detach()

    steps = [("deepmoe", ours_step)]
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)  # same weights for transformers
        for impl in args.hf_impl:
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, experts_implementation=impl).to(device).train()
            hf_opt = build_optimizer(hf, opt_cfg)

            def hf_step(hf=hf, hf_opt=hf_opt) -> torch.Tensor:
                with autocast:
                    loss = cross_entropy(hf(input_ids=x).logits, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0, foreach=True)
                hf_opt.step()
                hf_opt.zero_grad(set_to_none=True)
                return loss.detach()

            steps.append((f"transformers {impl}", hf_step))
    return steps


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
    preset = args.preset or ("ref-813M" if device.type == "cuda" else "tiny")
    args.seq_len = args.seq_len or (1024 if device.type == "cuda" else 256)
    cfg = ModelConfig.from_preset(preset).replace(num_nextn_predict_layers=0)

    steps = make_steps(args, cfg, device)
    first = {name: float(step()) for name, step in steps}  # same weights, same batch: same first loss
    ref = first["deepmoe"]
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {where}, torch {torch.__version__}, {preset} (MTP off), batch {args.batch_size} x {args.seq_len}, "
          f"{precision}")
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
    tokens = args.batch_size * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in where), None)
    rates = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rates[name] = tokens / med
        line = f"{name:<26} {rates[name]:>10,.0f} tok/s  {med * 1e3:8.1f} ms/step (median of {len(ts)})"
        if peak:
            line += f"  MFU {rates[name] * fpt / peak:.1%}"
        if name in peak_mem:  # both models stay resident, so this includes the other's weights and state
            line += f"  peak mem {peak_mem[name] / 2**30:.1f} GiB"
        print(line)
    best_ref = max((v, n) for n, v in rates.items() if n != "deepmoe")
    print(f"deepmoe / {best_ref[1]} (fastest transformers): {rates['deepmoe'] / best_ref[0]:.2f}x")
    print(f"model FLOPs/token {fpt / 1e6:.1f}M (6·N_active_matmul + causal attention)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
