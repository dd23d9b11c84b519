"""torchao's weight-only int8/int4 against deepmoe's own (deepmoe/quant/), on the same layers, in one process.

    pip install torchao    # optional: only this benchmark imports it; deepmoe does not depend on it
    OMP_NUM_THREADS=1 python benchmarks/torchao_compare.py --model MODEL_DIR [--max-batches 40]   # CPU, fp32
    python benchmarks/torchao_compare.py --device cuda [--preset ref-813M]    # GPU, bf16, random weights

Which layers. torchao swaps a module's 2-D `weight` for a tensor subclass whose F.linear runs its kernel.
Two kinds of deepmoe's quantised tensors are out of its reach (torchao 0.18, found by running it):
  - the routed experts (`Experts`: stacked (E, out, in) Parameters, multiplied through torch._grouped_mm or
    one mm per active expert, never through F.linear). Int8WeightOnlyConfig wraps the 3-D Parameter, but its
    Int8Tensor implements no transpose (nor _grouped_mm), so the MoE layer's first product fails; the CPU int4
    config refuses Parameters that are not a module's weight, and IntxWeightOnlyConfig takes 2-D/4-D only.
  - kv_b_proj: absorbed MLA attention (every cached decode step) views its weight per head,
    `weight.view(H, ·, r)`, which none of torchao's weight tensors implement.
So every variant quantises exactly `target_modules(model, scheme, SKIP)`: the projections `deepmoe quantize`
would take, less those two. The embedding, head and routers stay in high precision everywhere.

Variants, each with groups of 128 input channels (a whole row where a weight has fewer inputs):
  deepmoe int8/int4  quantize_model: symmetric, scale = absmax/127 (/7), codes [-127, 127] ([-7, 7]); on CPU
                     the ATen kernels where they fit (prepare_cpu, as loading a quantised directory does)
  torchao int8       Int8WeightOnlyConfig(granularity=PerGroup(128)): symmetric, scale = absmax/127.5, codes
                     [-128, 127] (the positive absmax rounds to 128 and is clipped to 127)
  torchao int8 row   Int8WeightOnlyConfig(): torchao's default, one scale per output row
  torchao int4       CPU: prototype PrototypeInt4WeightOnlyConfig (ATen's CPU tinygemm kernel); CUDA:
                     Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d") (tinygemm). Both asymmetric:
                     scale = (max − min)/15 and a float zero per group, codes [0, 15]
  torchao intx int4  IntxWeightOnlyConfig(torch.int4, PerGroup(128)): symmetric, scale = absmax/7.5, codes
                     [-8, 7]; F.linear dequantises, then multiplies
Int4WeightOnlyConfig's other formats do not run on a CPU build: plain and preshuffled need the mslk (CUDA)
library, plain_int32 is XPU-only. Rounding is round-half-to-even on every side.

Figures: held-out perplexity (with --model: benchmarks/quantization.py's); the weights each variant actually
multiplies by, read back through the module (module(I)ᵀ), against the model's and against deepmoe's of the
same bits; batch-1 greedy decode tokens/s through deepmoe's engine (benchmarks/quantization.py's
decode_runner; every variant once per round, --repeats rounds, the median). Without --model the weights are
random ones of --preset (no perplexity). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from quantization import decode_runner, load, perplexity  # benchmarks/ (the script's folder is on sys.path)
from timing import time_calls

from deepmoe.config import ModelConfig
from deepmoe.model import build_model
from deepmoe.quant import QuantScheme, prepare_cpu, quantize_model
from deepmoe.quant.quantize import target_modules
from deepmoe.tokenizer import load_tokenizer, train_bpe

SKIP = [r"mlp\.experts\.", r"kv_b_proj$"]  # what torchao cannot take (module docstring)
GROUP = 128


@dataclass
class Variant:
    label: str
    bits: int | None  # None: the unquantised model
    apply: Callable  # (model, names) → None: quantises those modules in place


def deepmoe_variant(bits: int) -> Variant:
    def apply(model, names):
        done = quantize_model(model, QuantScheme(f"int{bits}", GROUP), SKIP)
        assert sorted(done) == sorted(names), "deepmoe quantised another set of modules"
        if model.lm_head.weight.device.type == "cpu":
            prepare_cpu(model)
    return Variant(f"deepmoe int{bits} g{GROUP}", bits, apply)


def torchao_variants(device: torch.device) -> list[Variant]:
    from torchao.quantization import (FqnToConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig,
                                      PerGroup, PerRow, quantize_)

    def make(label: str, bits: int, config_for) -> Variant:
        def apply(model, names):
            # one config per module: a weight with fewer inputs than GROUP is one group, as on deepmoe's side
            configs = {n: config_for(min(GROUP, model.get_submodule(n).in_features)) for n in names}
            quantize_(model, FqnToConfig(configs), filter_fn=None)
            plain = [n for n in names if type(model.get_submodule(n).weight.data) is torch.Tensor]
            if plain:  # torchao skips a weight it cannot take with a log line, not an error
                raise RuntimeError(f"torchao left {len(plain)} weights unquantised, e.g. {plain[0]}")
        return Variant(label, bits, apply)

    if device.type == "cuda":
        from torchao.quantization.quantize_.workflows import Int4PackingFormat

        def int4(g):
            return Int4WeightOnlyConfig(group_size=g, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
                                        set_inductor_config=False)
    else:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        def int4(g):
            return PrototypeInt4WeightOnlyConfig(group_size=g, set_inductor_config=False)
    return [
        make(f"torchao int8 g{GROUP}", 8,
             lambda g: Int8WeightOnlyConfig(granularity=PerGroup(g), set_inductor_config=False)),
        make("torchao int8 per row", 8, lambda g: Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)),
        make(f"torchao int4 g{GROUP} (tinygemm)", 4, int4),
        make(f"torchao intx int4 g{GROUP}", 4, lambda g: IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                              granularity=PerGroup(g))),
    ]


@torch.no_grad()
def effective_weights(model, names: list[str]) -> dict[str, torch.Tensor]:
    """The (out, in) matrix each module multiplies by, as the module computes it: module(I)ᵀ, fp32. One
    product term per output element, so this is the dequantised weight whatever the kernel's layout."""
    out = {}
    for n in names:
        m = model.get_submodule(n)
        eye = torch.eye(m.in_features, dtype=model.lm_head.weight.dtype, device=model.lm_head.weight.device)
        out[n] = m(eye).T.float()
    return out


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |a − b|, rms(a − b)) over every element of every weight."""
    mx, sq, n = 0.0, 0.0, 0
    for k in a:
        d = a[k] - b[k]
        mx, sq, n = max(mx, float(d.abs().max())), sq + float(d.square().sum()), n + d.numel()
    return mx, math.sqrt(sq / n)


def cpu_name() -> str:
    """The processor's model name (platform.processor() says only "x86_64" on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compare(base, tokenizer, model_dir: Path | None, max_batches: int, new_tokens: int, repeats: int
            ) -> list[dict]:
    """Every variant of `base` (each on a copy): one dict of figures per variant, in the order of the table;
    a variant that fails gets its error instead of figures."""
    device = base.lm_head.weight.device
    names = target_modules(base, QuantScheme("int8", GROUP), SKIP)
    theirs = torchao_variants(device)  # int8 g128, int8 per row, int4, intx int4: each after ours of its bits
    variants = [Variant(f"{str(base.lm_head.weight.dtype).removeprefix('torch.')} (not quantised)", None,
                        lambda m, n: None), deepmoe_variant(8), *theirs[:2], deepmoe_variant(4), *theirs[2:]]
    reference = effective_weights(base, names)
    ours: dict[int, dict[str, torch.Tensor]] = {}
    rows, runners = [], {}
    for v in variants:
        row = {"label": v.label, "bits": v.bits, "modules": len(names), "error": None}
        model = copy.deepcopy(base)
        try:
            v.apply(model, names)
            w = effective_weights(model, names)
            row["max_err"], row["rms_err"] = differences(w, reference)
            if v.label.startswith("deepmoe"):
                ours[v.bits] = w
            elif v.bits:
                row["vs_deepmoe"] = differences(w, ours[v.bits])[0]
            if model_dir is not None and device.type == "cpu":
                row["ppl"] = perplexity(model_dir, max_batches, model)["ppl"]
            try:
                runners[v.label] = decode_runner(model, tokenizer)
            except Exception as e:  # noqa: BLE001 — CUDA graph capture of a tensor subclass: say so, run eagerly
                if device.type != "cuda":
                    raise
                print(f"{v.label}: CUDA-graph decode failed ({type(e).__name__}: {e}); timing eagerly", flush=True)
                runners[v.label] = decode_runner(model, tokenizer, cuda_graphs=False)
                row["eager"] = True
        except Exception as e:  # noqa: BLE001 — one variant failing must not hide the others' figures
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(f"{v.label}: {row['error'] or 'built'}", flush=True)
        rows.append(row)
    # decode timed in rounds, each variant once per round, median: on a shared machine a load change then
    # lands on every variant rather than on whichever ran during it
    times = {label: [] for label in runners}
    for _ in range(repeats):
        for label, run in runners.items():
            times[label] += time_calls(lambda run=run: run(new_tokens), 1, device)
    for row in rows:
        if row["label"] in times:
            row["tok_s"] = new_tokens / statistics.median(times[row["label"]])
    return rows


def table(rows: list[dict]) -> list[str]:
    base_ppl = rows[0].get("ppl")
    lines = ["| weights | held-out ppl (Δ) | max abs(w − w₀) | rms(w − w₀) | max abs(w − deepmoe's) "
             "| decode tokens/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            cells = [f"failed: {r['error']}", "", "", "", ""]
        else:
            ppl = f"{r['ppl']:.3f} ({100 * (r['ppl'] / base_ppl - 1):+.2f}%)" if "ppl" in r else "—"
            vs = f"{r['vs_deepmoe']:.3g}" if "vs_deepmoe" in r else "—"
            cells = [ppl, f"{r['max_err']:.3g}", f"{r['rms_err']:.3g}", vs,
                     f"{r['tok_s']:.1f}" + (" (eager)" if r.get("eager") else "")]
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a `deepmoe train` output (train_config.json beside it) for "
                                               "perplexity; default: random weights of --preset, no perplexity")
    p.add_argument("--preset", default="ref-813M")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-batches", type=int, default=40, help="held-out batches of 8 × seq_len tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    try:
        import torchao
    except ImportError:
        print("torchao is not installed: pip install torchao (deepmoe itself does not need it)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.model:
        base = load(args.model).to(device, dtype)
        tokenizer, label = load_tokenizer(args.model), str(args.model)
    else:
        cfg = ModelConfig.from_preset(args.preset).replace(num_nextn_predict_layers=0)
        base = build_model(cfg, device=device, dtype=dtype).eval()
        tokenizer, label = train_bpe(["x"], 300), f"{args.preset} (random weights)"  # the engine reads eos only
    rows = compare(base, tokenizer, args.model, args.max_batches, args.new_tokens, args.repeats)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} thread(s)")
    print(f"\n{datetime.date.today()}, {where}, torch {torch.__version__}, torchao {torchao.__version__}; {label}; "
          f"{rows[0]['modules']} projections quantised on every side (not the routed experts or kv_b_proj); "
          f"batch-1 greedy decode of {args.new_tokens} tokens after 16, median of {args.repeats} rounds\n")
    print("\n".join(table(rows)))
    if not rows[0]["error"]:  # one line per variant for the GPU suite's summary
        print()
        for r in rows[1:]:
            if not r["error"]:
                print(f"{r['label']}: decode {r['tok_s']:.1f} tok/s, {r['tok_s'] / rows[0]['tok_s']:.2f}x unquantised")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
