"""A parallelism plan (deepmoe/parallel/plan.py) as text for `deepmoe info --plan`, and the docs/scale.md page:

    python -m deepmoe.parallel.plan_report --write docs/scale.md

Every figure is arithmetic from the config's shapes, not a measurement, and each output says so first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ModelConfig
from .plan import FP8_BLOCK, ParallelPlan, PlanReport, make_plan

HEADLINE = "arithmetic, not measured"


def size(n: float, unit: str = "B") -> str:
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {suffix}{unit}"
    return f"{n:.0f} {unit}"


def count(n: float) -> str:
    """Parameters: 2.68B, 704.61M."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def describe(r: PlanReport) -> list[tuple[str, str]]:
    """(label, text) lines that say what was assumed."""
    p, cfg = r.plan, r.cfg
    E = cfg.n_routed_experts or 0
    experts = (f"ep {p.ep}: {E // p.ep} routed experts per MoE layer per GPU, {p.expert_replicas} "
               f"replica{'s' if p.expert_replicas > 1 else ''} of each" if E else "dense model, no experts")
    zero = {0: "no ZeRO (replicated)", 1: "ZeRO-1 (optimizer state sharded)", 2: "ZeRO-2 (+ gradients sharded)",
            3: "ZeRO-3 / FSDP (+ weights sharded)"}[p.zero]
    weights = (f"GEMM weights fp8 (+ an fp32 scale per {FP8_BLOCK}x{FP8_BLOCK} block), the rest bf16"
               if p.weights == "fp8" else "weights bf16")
    per_pipe = p.batch // (p.dp * p.micro_batch)
    flight = f"{p.in_flight} micro-batches" if p.in_flight else "1F1B, pp - stage micro-batches"
    return [
        ("plan", f"{HEADLINE}: {p.world} GPUs = pp {p.pp} x dp {p.dp}, tp 1; {experts}; {zero}"),
        ("precision", f"{weights}; grads {p.grads}; master weights fp32; AdamW moments {p.moments}; "
                      "activations bf16"),
        ("batch", f"{p.batch} x {p.seq_len} tokens per step; micro-batch {p.micro_batch} x {p.seq_len}, "
                  f"{per_pipe} per pipeline per step; activations held: {flight}"),
    ]


STAGE_COLUMNS = ("stage", "layers", "params/GPU", "routed", "weights", "grads", "optimizer",
                 "acts ckpt", "acts full", "total ckpt", "total full")


def stage_rows(r: PlanReport) -> list[tuple[str, ...]]:
    return [(str(m.stage.index), m.stage.describe(), count(m.params), count(m.routed), size(m.weights + m.gather),
             size(m.grads), size(m.optimizer), size(m.activations_ckpt), size(m.activations), size(m.total_ckpt),
             size(m.total)) for m in r.stages]


def traffic(r: PlanReport) -> list[tuple[str, str]]:
    a = r.a2a
    if a is None:
        return [("all-to-all", "none: the model has no routed experts")]
    kind = "fp8 + scales" if r.plan.weights == "fp8" else "bf16"
    cfg = r.cfg
    busiest = max(r.stages, key=lambda m: m.stage.moe_layers(cfg)).stage.index
    return [
        ("all-to-all", f"per token per MoE layer: dispatch {a.copies} x {size(a.dispatch / a.copies)} ({kind}) = "
                       f"{size(a.dispatch)}, combine {a.copies} x {size(a.combine / a.copies)} (bf16) = "
                       f"{size(a.combine)}; {a.off_gpu:.1%} of copies leave the GPU when load is balanced"),
        ("cross-node", f"none: the {r.plan.ep} expert-parallel ranks fit in one node of {r.plan.gpus_per_node} GPUs"
         if a.remote_nodes == 0 else
         f"a token reaches at most {a.nodes} nodes ({r.plan.gpus_per_node} GPUs each): at most "
         f"{size(a.ib_dispatch)} dispatch + {size(a.ib_combine)} combine per token per MoE layer between nodes"),
        ("per step", f"{size(a.step_gpu)} sent per GPU of stage {busiest} (forward + backward; "
                     f"{size(a.step_gpu_ckpt)} with checkpointed layers recomputed), {size(a.step_total)} all GPUs"),
    ]


def format_plan(r: PlanReport) -> str:
    """The text `deepmoe info --plan` prints."""
    rows = [STAGE_COLUMNS, *stage_rows(r)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(STAGE_COLUMNS))]
    table = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    w, wc = r.worst, r.worst_ckpt
    peak = [("per GPU", f"at most {size(wc.total_ckpt)} with every layer checkpointed (stage {wc.stage.index}), "
                        f"{size(w.total)} without (stage {w.stage.index})")]
    return "\n".join([*(f"{k:<16} {v}" for k, v in describe(r)), *table,
                      *(f"{k:<16} {v}" for k, v in peak + traffic(r))])


# ---- the docs page ---------------------------------------------------------------------------------------
V3_PUBLISHED = ParallelPlan(pp=16, ep=64, dp=128, zero=1, seq_len=4096, micro_batch=1, global_batch=15360,
                            weights="fp8", grads="fp32", moments="bf16")
SETUPS = [  # (title, preset, plan)
    ("DeepSeek-V3 as published: 2048 GPUs, PP16 x EP64 x ZeRO-1 DP, FP8 GEMMs, bf16 moments", "deepseek-v3",
     V3_PUBLISHED),
    ("DeepSeek-V3, plain bf16 weights and fp32 moments, otherwise as published", "deepseek-v3",
     ParallelPlan(pp=16, ep=64, dp=128, zero=1, global_batch=15360)),
    ("DeepSeek-V3 on 1024 GPUs with FSDP: PP8 x EP64 x ZeRO-3 DP", "deepseek-v3",
     ParallelPlan(pp=8, ep=64, dp=128, zero=3, global_batch=15360, weights="fp8", moments="bf16")),
    ("DeepSeek-V2-Lite on 16 GPUs: PP2 x EP8 x ZeRO-1 DP", "deepseek-v2-lite",
     ParallelPlan(pp=2, ep=8, dp=8, zero=1, seq_len=4096, micro_batch=1, global_batch=256)),
    ("ref-813M on 8 GPUs: EP8 x FSDP, no pipeline", "ref-813M",
     ParallelPlan(pp=1, ep=8, dp=8, zero=3, seq_len=1024, micro_batch=8, global_batch=64)),
]


def markdown(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    align = ["---" if i < 2 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(row) + " |" for row in (header, align, *rows)]


def page() -> str:
    """docs/scale.md."""
    out = [
        "# Scale on paper: parallelism plans (arithmetic, not measured)",
        "",
        "Generated by `python -m deepmoe.parallel.plan_report --write docs/scale.md`; the same figures for any",
        "preset or config come from `deepmoe info --preset deepseek-v3 --plan pp=16,ep=64,dp=128 --global-batch",
        "15360 --weights fp8 --moments bf16`. **Every number here is arithmetic from the model's shapes, not a",
        "measurement**: no multi-GPU run of deepmoe has produced them (deepmoe trains on one device today).",
        "",
        "## What is counted",
        "- **Layout.** world = pp x dp, no tensor parallelism. In each pipeline stage the dp ranks hold the",
        "  attention, dense and shared-expert weights; ep of them split the routed experts, so each expert has",
        "  dp / ep replicas and its ZeRO shards span those. Layers are spread as evenly as they go with the MTP",
        "  depths counted as layers of the last stage; the two end stages get the shorter share (they also hold",
        "  the embedding, and the head and loss). With MTP the last stage keeps a copy of the embedding.",
        "- **Weights, gradients, optimizer.** Working weights bf16, or FP8 for the GEMM weights with one fp32",
        f"  scale per {FP8_BLOCK}x{FP8_BLOCK} block (embedding, head, norms and router stay bf16); gradients fp32 or",
        "  bf16; fp32 master weights and two AdamW moments in fp32 or bf16. ZeRO-1 shards the optimizer state,",
        "  2 also the gradients, 3 (FSDP) also the weights, plus two layers gathered at a time.",
        "- **Activations**, per token per layer, from the shapes: MLA in its naive training form with a",
        "  flash-style kernel (q, k, v, output, fp32 log-sum-exp; no T x T scores), the inputs each RMSNorm and",
        "  Linear backward reads, the router's fp32 scores, the k dispatched copies, fused SwiGLU's gate and up",
        "  and product per copy, the k expert outputs, the shared expert; all bf16. 1F1B holds pp - s",
        "  micro-batches on stage s. Checkpointing every layer keeps its input and rebuilds one layer at a time.",
        "  The last stage adds fp32 logits for the micro-batch in its loss (main + MTP).",
        "- **All-to-all**: per token per MoE layer, k copies of the hidden state dispatched (FP8 + 1x128-tile",
        "  scales when the GEMMs are FP8, else bf16) and k outputs combined in bf16; the backward mirrors it.",
        "  Between nodes at most one copy per node a token reaches (DeepSeek forwards within a node over",
        "  NVLink); node-limited routing caps those nodes when each expert group lives on one node.",
        "",
    ]
    for title, preset, plan in SETUPS:
        cfg = ModelConfig.from_preset(preset)
        r = make_plan(cfg, plan)
        c = r.counts
        out += [f"## {title}", "",
                f"`{preset}`: {count(c['total'])} parameters ({count(c['activated_deepseek'])} activated per "
                "token without the input embedding, the count nearest DeepSeek's published figures"
                + (f"; MTP's own {count(c['mtp'])} not included)." if c["mtp"] else ")."), ""]
        out += [f"- **{k}**: {v}" for k, v in describe(r)] + [""]
        out += markdown(stage_rows(r), STAGE_COLUMNS) + [""]
        w, wc = r.worst, r.worst_ckpt
        out += [f"- **per GPU**: at most {size(wc.total_ckpt)} with every layer checkpointed (stage "
                f"{wc.stage.index}), {size(w.total)} without (stage {w.stage.index})"]
        out += [f"- **{k}**: {v}" for k, v in traffic(r)] + [""]
    out += [
        "## Where this departs from DeepSeek-V3's published setup",
        "- DeepSeek ran DualPipe, not 1F1B: it keeps two copies of each stage's parameters and about pp + 1",
        "  micro-batches of activations; this page models 1F1B.",
        "- DeepSeek did not checkpoint whole layers: it recomputed RMSNorm, the MLA up-projections and SwiGLU",
        "  and cached several activations in FP8. Its activation memory lies between the two columns here;",
        "  without any recomputation the published setup does not fit in 80 GB at 4096-token micro-batches.",
        "- DeepSeek's micro-batch size and its placement of layers on stages are not published; the ones",
        "  here are assumptions.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write docs/scale.md: parallelism plans, arithmetic, not measured")
    ap.add_argument("--write", metavar="PATH", help="write the page here (default: print it)")
    args = ap.parse_args(argv)
    text = page()
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
