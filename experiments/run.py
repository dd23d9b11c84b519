"""Small-scale ablations of DeepSeek's MoE design, trained with `deepmoe train` on the same tokens.

    (a) moe-vs-dense: DeepSeekMoE (1 shared + 16 fine-grained routed experts, top-4) against a dense model
        with the same activated parameters per token (every FFN a SwiGLU as wide as shared + 4 experts).
    (b) balancing: aux-loss-free bias balancing (γ) vs a sequence-wise auxiliary loss (α) vs neither,
        on the same MoE model: validation loss and how evenly the experts are used (MaxVio).

Every run uses the same seed, so the same initial weights where shapes agree and the same batches in the
same order. Results go to docs/experiments/ (results.json and PNG plots); docs/experiments.md discusses them.

    python experiments/run.py                 # all runs, CPU-sized defaults (tiny widths, 300 steps)
    python experiments/run.py --steps 2000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepmoe.config import ModelConfig
from deepmoe.stats import model_stats
from deepmoe.train.config import TrainConfig, resolve
from deepmoe.train.loop import train
from deepmoe.train.plots import read_metrics

ROOT = Path(__file__).resolve().parent.parent
LAST = 50  # balance figures average the last LAST steps


def model_configs() -> dict[str, ModelConfig]:
    # tiny, with the dense layer's width equal to the MoE layers' activated width (1 shared + 4 routed
    # experts of 128 = 640), so "dense" below differs from "moe" only in the routed experts
    moe = ModelConfig.from_preset("tiny").replace(num_nextn_predict_layers=0, intermediate_size=640)
    dense = moe.replace(first_k_dense_replace=moe.num_hidden_layers)
    return {"moe": moe, "dense": dense}


RUNS = {  # name: (model, TrainConfig overrides)
    "moe-auxfree": ("moe", dict(bias_update_rate=1e-3, aux_loss_alpha=0.0)),
    "dense": ("dense", dict(bias_update_rate=0.0, aux_loss_alpha=0.0)),
    "moe-auxloss": ("moe", dict(bias_update_rate=0.0, aux_loss_alpha=1e-2)),
    "moe-none": ("moe", dict(bias_update_rate=0.0, aux_loss_alpha=0.0)),
    # V3's γ = 1e-3 moves a bias by at most 0.3 in a 300-step run; a 10x faster rate shows the mechanism
    # at this run length
    "moe-auxfree-fast": ("moe", dict(bias_update_rate=1e-2, aux_loss_alpha=0.0)),
}


def run_all(args) -> dict[str, dict]:
    out_root = ROOT / "experiments" / "runs"
    out_root.mkdir(parents=True, exist_ok=True)
    configs = model_configs()
    results = {}
    for name, (model_name, overrides) in RUNS.items():
        if args.only and name not in args.only:
            continue
        cfg_path = out_root / f"{model_name}.json"
        cfg_path.write_text(json.dumps(configs[model_name].to_hf_dict(), indent=2))
        out = out_root / name
        tc = TrainConfig(model_config=str(cfg_path), out=str(out), steps=args.steps, device=args.device,
                         seed=0, progress=False, sample_tokens=0, eval_every=max(args.steps // 6, 1),
                         checkpoint_every=args.steps, keep_checkpoints=1, **overrides)
        tc, model_cfg = resolve(tc, cuda_available=False)
        summary = train(tc, model_cfg, resume=(out / "summary.json").is_file(), echo=lambda *a: None)
        results[name] = summarise(name, out, model_cfg, summary)
        print(json.dumps({k: v for k, v in results[name].items() if not k.endswith("_curve")}), flush=True)
    return results


def summarise(name: str, run: Path, model_cfg: ModelConfig, summary: dict) -> dict:
    train_records, val_records = read_metrics(run / "metrics.jsonl")
    tail = train_records[-LAST:]
    r = {"run": name, "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"],
         "train_loss_last": sum(t["ce"] for t in tail) / len(tail), "tokens": summary["tokens"],
         "activated_params": model_stats(model_cfg).activated, "total_params": model_stats(model_cfg).total,
         "tokens_per_s": summary["tokens_per_s"],
         "val_curve": [(v["step"], v["val_loss"]) for v in val_records]}
    if tail[0]["max_vio"]:
        per_layer = list(zip(*(t["max_vio"] for t in tail)))
        r["max_vio_last"] = [sum(v) / len(v) for v in per_layer]
        r["max_vio_mean"] = sum(r["max_vio_last"]) / len(r["max_vio_last"])
        r["dead_experts_last"] = tail[-1]["dead_experts"]
        r["max_vio_curve"] = [(t["step"], sum(t["max_vio"]) / len(t["max_vio"])) for t in train_records]
    return r


def plot(results: dict[str, dict], dest: Path) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams["font.size"] = 9
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for name, r in results.items():
        steps, losses = zip(*r["val_curve"][:-1])  # periodic sample; the last point is the whole split
        ax1.plot(steps, losses, marker="o", label=f"{name} (final, whole split: {r['val_loss']:.3f})")
        if "max_vio_curve" in r:
            s, v = zip(*r["max_vio_curve"])
            k = 20  # moving average: per-step MaxVio is noisy at 2k tokens per step
            smooth = [sum(v[max(0, i - k + 1): i + 1]) / len(v[max(0, i - k + 1): i + 1]) for i in range(len(v))]
            ax2.plot(s, smooth, label=name)
    ax1.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation loss (periodic sample)")
    ax2.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", title="expert load imbalance", yscale="log")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="*", help=f"a subset of {', '.join(RUNS)}")
    args = p.parse_args(argv)
    results = run_all(args)
    dest = ROOT / "docs" / "experiments"
    dest.mkdir(parents=True, exist_ok=True)
    previous = json.loads((dest / "results.json").read_text()) if (dest / "results.json").is_file() else {}
    results = previous | results
    # one run per line: the curves make an indented file thousands of lines long
    (dest / "results.json").write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in
                                                           results.items()) + "\n}\n")
    plot({k: results[k] for k in ("moe-auxfree", "dense") if k in results}, dest / "moe_vs_dense.png")
    plot({k: results[k] for k in ("moe-auxfree", "moe-auxfree-fast", "moe-auxloss", "moe-none") if k in results},
         dest / "balancing.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
