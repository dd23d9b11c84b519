"""AWQ (activation-aware weight quantisation) for deepmoe's int8 / int4 schemes: per-input-channel scales
searched on calibration activations and folded into the layer before, so the quantised model runs exactly as
a round-to-nearest one does (no extra work at run time); then an optional per-group clipping search.

Why it helps: a weight column multiplied by s > 1 (and its input divided by s) keeps the product but puts
that column's entries further from the rounding grid's step, which is set by the group's absmax. Columns
meeting large activations matter most to the output, so s = mean|x|^α (normalised to geometric mean 1) for
the α in a grid that minimises the quantised layer's output error on calibration inputs; α = 0 is plain
rounding, so the search is never worse than it on its own objective.

Where each scale is folded (every fold is exact in real arithmetic):
  input_layernorm.weight / s        → q_a_proj (or q_proj) and kv_a_proj_with_mqa columns · s
  q_a_layernorm.weight / s          → q_b_proj columns · s
  kv_a_layernorm.weight / s         → kv_b_proj columns · s
  kv_b_proj's value rows / s        → o_proj columns · s (attention is linear in the values)
  post_attention_layernorm.weight / s → the router's columns · s (kept in high precision: the routing is
                                        unchanged), the dense MLP's or the shared and every routed expert's
                                        gate_proj and up_proj columns · s
  up_proj rows / s                  → down_proj columns · s (silu(g)·u is linear in u); per routed expert
A routed expert's down_proj scale is searched on the tokens routed to it; an expert that received no
calibration token keeps s = 1 (counted in the report). The experts' gate/up share the norm's one scale,
searched on the error of every expert over its own tokens, each token's error weighted by its routing
weight squared (its share of the layer's output), together with the shared experts over all tokens.

Errors are relative (the squared output error over the squared output, per projection), so projections of
different widths and magnitudes count alike. Layers are visited in order; each layer's calibration inputs are
the previous layer's outputs in the original precision (not yet quantised), as in the AWQ paper.

Clipping (opt-in): per group of each projection, the absmax is shrunk by the ratio in `CLIP_RATIOS` that minimises
that group's share of the output error, and the weight is clamped to it before rounding (clamping then
absmax rounding is rounding with the shrunk scale). Projections producing queries or keys (`q_*`, `kv_a_*`,
`kv_b_*`) are not clipped: attention scores multiply two of them, and AWQ leaves them alone for that reason.
It is off by default because on the one trained model measured (docs/quantization.md) it lowered the
calibration objective yet raised held-out perplexity, for the MLPs and experts and for o_proj alike.

The MTP layers (used only for speculative decoding) are rounded without AWQ: calibrating them would need
their own inputs (the main model's hidden states and the next tokens), and they are not on the main path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .scheme import QuantError, QuantScheme, fake_quantize

ALPHAS = tuple(i / 20 for i in range(21))  # 0 = plain rounding … 1 = scales ∝ mean|x|
CLIP_RATIOS = tuple(1 - i / 20 for i in range(11))  # 1.0 … 0.5 of each group's absmax
NO_CLIP = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
MAX_ROWS = 4096  # calibration rows per projection in the searches (evenly spaced subsample beyond this)
CLIP_ROWS = 512  # rows for the clipping search, which keeps a (rows, out, groups) product


@dataclass
class AwqReport:
    layers: int = 0
    groups: int = 0  # scale searches run
    clipped: int = 0  # projections whose groups were clip-searched
    experts_without_tokens: int = 0  # routed experts (per layer) that kept s = 1 for their down_proj
    error_rtn: float = 0.0  # summed relative output error of the searched groups at α = 0 (plain rounding)
    error_awq: float = 0.0  # … at the chosen α
    alphas: list[float] = field(default_factory=list)

    def search(self, terms: list[Term], mean_abs: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """search_scale, with its outcome counted here; → the scale s."""
        s, alpha, rtn, err = search_scale(terms, mean_abs, scheme)
        self.groups += 1
        self.error_rtn += rtn
        self.error_awq += err
        self.alphas.append(alpha)
        return s


# ---- the searches: pure functions of (inputs, weights) --------------------------------------------------
def subsample(x: torch.Tensor, rows: int) -> torch.Tensor:
    """At most `rows` evenly spaced rows of x (N, d): deterministic, spread over every calibration sample."""
    if x.shape[0] <= rows:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, rows, device=x.device).round().long()]


def channel_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α, normalised so that max(s)·min(s) = 1 (keeps the weights' range centred)."""
    s = mean_abs.float().clamp(min=1e-5).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class Term:
    """One projection's share of a scale search: its input rows x (n, in), weight w (out, in) and, for a
    routed expert, each row's weight in the output (its routing weight) — None for 1."""
    x: torch.Tensor
    w: torch.Tensor
    row_weight: torch.Tensor | None = None


def _relative_error(term: Term, w_hat: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    err = (x @ (term.w - w_hat).T).pow(2).sum(-1)  # (n,)
    den = ref.pow(2).sum(-1)
    if term.row_weight is not None:
        rw = term.row_weight.pow(2)
        err, den = err * rw, den * rw
    return err.sum() / den.sum().clamp(min=1e-30)


def search_scale(terms: list[Term], mean_abs: torch.Tensor, scheme: QuantScheme,
                 alphas: tuple[float, ...] = ALPHAS) -> tuple[torch.Tensor, float, float, float]:
    """The per-input-channel scale s for projections sharing one input: → (s, α, error at α = 0, error at α),
    errors summed over the terms. Quantising w·s and dividing the input by s is, for the output, w_hat =
    Q(w·s)/s applied to the unscaled input, which is what is scored."""
    xs = [subsample(t.x, MAX_ROWS).float() for t in terms]
    rws = [None if t.row_weight is None else subsample(t.row_weight, MAX_ROWS).float() for t in terms]
    terms = [Term(x, t.w.float(), rw) for x, t, rw in zip(xs, terms, rws)]
    refs = [t.x @ t.w.T for t in terms]
    best = (math.inf, None, None)
    rtn = math.inf
    for alpha in alphas:
        s = channel_scales(mean_abs, alpha)
        err = sum(float(_relative_error(t, fake_quantize(t.w * s, scheme) / s, t.x, ref))
                  for t, ref in zip(terms, refs))
        if alpha == 0:
            rtn = err
        if err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    return s, alpha, rtn, err


def search_clip(x: torch.Tensor, w: torch.Tensor, scheme: QuantScheme, row_weight: torch.Tensor | None = None,
                ratios: tuple[float, ...] = CLIP_RATIOS, chunk: int = 256) -> torch.Tensor:
    """w (out, in) clamped per group to the fraction of its absmax that minimises the group's output error
    on inputs x (n, in); → the clamped weight (ratio 1 = unchanged is one of the candidates)."""
    out_f, in_f = w.shape
    g = scheme.group_for(in_f)
    G = in_f // g
    x = subsample(x, CLIP_ROWS).float()
    rw = None if row_weight is None else subsample(row_weight, CLIP_ROWS).float().pow(2)
    xg = x.view(-1, G, g)
    result = torch.empty_like(w, dtype=torch.float32)
    for o in range(0, out_f, chunk):  # (rows, chunk, G) at a time
        wc = w[o:o + chunk].float().view(-1, G, g)
        amax = wc.abs().amax(-1, keepdim=True)
        best_err = torch.full(wc.shape[:2], math.inf, device=w.device)
        best_w = wc.clone()
        for r in ratios:
            lim = amax * r
            clamped = torch.maximum(torch.minimum(wc, lim), -lim)
            q = fake_quantize(clamped.view(-1, in_f), scheme).view_as(wc)
            # each group's contribution to each output: (n, chunk, G)
            d = torch.einsum("ngk,ogk->nog", xg, wc - q)
            e = d.pow(2)
            e = (e * rw[:, None, None]).sum(0) if rw is not None else e.sum(0)
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_w = torch.where(better.unsqueeze(-1), clamped, best_w)
        result[o:o + chunk] = best_w.view(-1, in_f)
    return result.to(w.dtype)


# ---- calibration over the model ---------------------------------------------------------------------------
def _capture(layer: nn.Module, xs: list[torch.Tensor], cos, sin) -> tuple[dict, list[torch.Tensor], list]:
    """Run one decoder block over the calibration batches: → (inputs of the projections by module name, as
    (rows, in) fp32, the block's outputs, the MoE routing of every batch)."""
    from ..model.moe import MoE

    feats: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def grab(name):
        def hook(_module, args):
            feats.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).float())
        return hook

    attn, mlp = layer.self_attn, layer.mlp
    first = attn.q_a_proj if hasattr(attn, "q_a_proj") else attn.q_proj
    watched = {"attn_in": first, "o_proj": attn.o_proj, "kv_b_proj": attn.kv_b_proj, "mlp_in": mlp}
    if hasattr(attn, "q_b_proj"):
        watched["q_b_proj"] = attn.q_b_proj
    if isinstance(mlp, MoE):
        if mlp.shared_experts is not None:
            watched["shared_down"] = mlp.shared_experts.down_proj
    else:
        watched["down"] = mlp.down_proj
    for name, m in watched.items():
        hooks.append(m.register_forward_pre_hook(grab(name)))
    outs, routings = [], []
    try:
        for x in xs:
            router_out = []
            outs.append(layer(x, cos, sin, router_out=router_out))
            routings.extend(router_out)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in feats.items()}, outs, routings


def _fold_norm(norm: nn.Module, s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))


def _scale_columns(w: torch.Tensor, s: torch.Tensor) -> None:
    w.mul_(s.to(w.dtype))


def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().mean(0)


def _routed_rows(routings, n_experts: int):
    """Per expert: (row indices into the layer's calibration tokens, routing weights) from every batch's
    routing, the rows numbered as the concatenated batches are."""
    idx = torch.cat([r.indices for r in routings])  # (N, k)
    wts = torch.cat([r.weights for r in routings]).float()
    N, k = idx.shape
    token = torch.arange(N, device=idx.device).repeat_interleave(k)
    flat, w = idx.reshape(-1), wts.reshape(-1)
    return [(token[flat == e], w[flat == e]) for e in range(n_experts)]


@torch.no_grad()
def awq_layer(layer: nn.Module, feats: dict, routings: list, scheme: QuantScheme, quantised: set[str],
              prefix: str, clip: bool, report: AwqReport) -> None:
    """Search and fold one decoder block's scales (and clip its weights) from its captured inputs.
    `quantised`: the block's module names (relative to `prefix`) that `deepmoe quantize` will quantise;
    others are scaled for exactness where they share a fold, but never scored or clipped."""
    from ..model.moe import MoE

    attn, mlp = layer.self_attn, layer.mlp
    inputs: dict[str, torch.Tensor] = {}  # each quantised projection's input after the folds (for clipping)

    def q(name: str) -> bool:
        return f"{prefix}{name}" in quantised

    def group(x: torch.Tensor, named: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
        terms = [Term(x, w) for name, w in named if q(name)]
        return report.search(terms, _mean_abs(x), scheme) if terms else None

    # attention input: input_layernorm → q_a_proj / q_proj and kv_a_proj_with_mqa
    first = "self_attn.q_a_proj" if hasattr(attn, "q_a_proj") else "self_attn.q_proj"
    named = [(first, attn.get_submodule(first.split(".")[1]).weight),
             ("self_attn.kv_a_proj_with_mqa", attn.kv_a_proj_with_mqa.weight)]
    x = feats["attn_in"]
    s = group(x, named)
    if s is not None:
        _fold_norm(layer.input_layernorm, s)
        for _, w in named:
            _scale_columns(w, s)
        x = x / s
    for name, _ in named:
        inputs[name] = x
    if hasattr(attn, "q_b_proj"):
        x = feats["q_b_proj"]
        s = group(x, [("self_attn.q_b_proj", attn.q_b_proj.weight)])
        if s is not None:
            _fold_norm(attn.q_a_layernorm, s)
            _scale_columns(attn.q_b_proj.weight, s)
            x = x / s
        inputs["self_attn.q_b_proj"] = x
    x = feats["kv_b_proj"]
    s = group(x, [("self_attn.kv_b_proj", attn.kv_b_proj.weight)])
    if s is not None:
        _fold_norm(attn.kv_a_layernorm, s)
        _scale_columns(attn.kv_b_proj.weight, s)
        x = x / s
    inputs["self_attn.kv_b_proj"] = x
    # o_proj: its input channel (head h, value dim j) is kv_b_proj's row h·(nope + v) + nope + j
    x = feats["o_proj"]
    s = group(x, [("self_attn.o_proj", attn.o_proj.weight)])
    if s is not None:
        H, nope, v = attn.n_heads, attn.nope, attn.v_dim
        kv_b = attn.kv_b_proj.weight.view(H, nope + v, -1)
        kv_b[:, nope:].div_(s.view(H, v, 1).to(kv_b.dtype))
        _scale_columns(attn.o_proj.weight, s)
        x = x / s
    inputs["self_attn.o_proj"] = x

    h = feats["mlp_in"]  # post_attention_layernorm's output
    if isinstance(mlp, MoE):
        ex = mlp.experts
        E = ex.n_experts
        rows = _routed_rows(routings, E)
        terms: list[Term] = []
        if mlp.shared_experts is not None and q("mlp.shared_experts.gate_proj"):
            terms += [Term(h, mlp.shared_experts.gate_proj.weight), Term(h, mlp.shared_experts.up_proj.weight)]
        routed_q = q("mlp.experts")
        if routed_q:
            for e, (tok, wt) in enumerate(rows):
                if len(tok):
                    xe = h[tok]
                    terms += [Term(xe, ex.gate_proj[e], wt), Term(xe, ex.up_proj[e], wt)]
        if terms:
            s = report.search(terms, _mean_abs(h), scheme)
            _fold_norm(layer.post_attention_layernorm, s)
            _scale_columns(mlp.gate.weight, s)  # the router sees x/s: scale its columns back (exact, fp32)
            if mlp.shared_experts is not None:
                _scale_columns(mlp.shared_experts.gate_proj.weight, s)
                _scale_columns(mlp.shared_experts.up_proj.weight, s)
            _scale_columns(ex.gate_proj, s)
            _scale_columns(ex.up_proj, s)
            h = h / s
        if mlp.shared_experts is not None:
            sh = mlp.shared_experts
            inputs["mlp.shared_experts.gate_proj"] = inputs["mlp.shared_experts.up_proj"] = h
            x = feats["shared_down"]
            s = group(x, [("mlp.shared_experts.down_proj", sh.down_proj.weight)])
            if s is not None:
                sh.up_proj.weight.div_(s.unsqueeze(-1).to(sh.up_proj.weight.dtype))
                _scale_columns(sh.down_proj.weight, s)
                x = x / s
            inputs["mlp.shared_experts.down_proj"] = x
        if routed_q:
            for e, (tok, wt) in enumerate(rows):
                gate, up, down = ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e]
                if not len(tok):
                    report.experts_without_tokens += 1
                    continue
                xe = h[tok]
                a = F.silu(xe @ gate.float().T) * (xe @ up.float().T)
                s = report.search([Term(a, down, wt)], _mean_abs(a), scheme)
                up.div_(s.unsqueeze(-1).to(up.dtype))
                _scale_columns(down, s)
                if clip:
                    for p, xin in (("gate_proj", xe), ("up_proj", xe), ("down_proj", a / s)):
                        w = getattr(ex, p)
                        w[e] = search_clip(xin, w[e], scheme, wt)
                    report.clipped += 3
    else:
        if q("mlp.gate_proj"):
            named = [("mlp.gate_proj", mlp.gate_proj.weight), ("mlp.up_proj", mlp.up_proj.weight)]
            s = group(h, named)
            _fold_norm(layer.post_attention_layernorm, s)
            for _, w in named:
                _scale_columns(w, s)
            h = h / s
        inputs["mlp.gate_proj"] = inputs["mlp.up_proj"] = h
        x = feats["down"]
        s = group(x, [("mlp.down_proj", mlp.down_proj.weight)])
        if s is not None:
            mlp.up_proj.weight.div_(s.unsqueeze(-1).to(mlp.up_proj.weight.dtype))
            _scale_columns(mlp.down_proj.weight, s)
            x = x / s
        inputs["mlp.down_proj"] = x
    if clip:
        for name, x in inputs.items():
            if not q(name) or name.rsplit(".", 1)[-1] in NO_CLIP:
                continue
            lin = layer.get_submodule(name)
            lin.weight.copy_(search_clip(x, lin.weight, scheme))
            report.clipped += 1


@torch.no_grad()
def apply_awq(model, tokens: torch.Tensor, scheme: QuantScheme, skip: list[str] = (), clip: bool = False,
              batch_size: int = 8, log=None) -> AwqReport:
    """Fold AWQ scales into a high-precision model in place (and clip its weights), from calibration token
    windows `tokens` (S, T). Quantising the result (quantize_model, or saving and `deepmoe quantize`) then
    gives the AWQ-quantised model; unquantised, the model computes what it did, up to rounding and the
    clipping."""
    from .quantize import target_modules

    if scheme.fp8:
        raise QuantError("AWQ applies to int8/int4; fp8 (128x128 blocks) is rounded directly")
    quantised = set(target_modules(model, scheme, skip))  # module names: projections, and Experts as a whole
    device = model.model.embed_tokens.weight.device
    tokens = tokens.to(device)
    report = AwqReport()
    cos, sin = model.rope(tokens.shape[1], 0, device)
    xs = [model.model.embed_tokens(tokens[i:i + batch_size]) for i in range(0, tokens.shape[0], batch_size)]
    for i, layer in enumerate(model.model.layers):
        feats, outs, routings = _capture(layer, xs, cos, sin)
        prefix = f"model.layers.{i}."
        awq_layer(layer, feats, routings, scheme, quantised, prefix, clip, report)
        report.layers += 1
        if log is not None:
            log(f"awq       layer {i}: {report.groups} scale searches so far, relative output error "
                f"{report.error_rtn:.4g} (rounding) → {report.error_awq:.4g} (AWQ, before clipping)")
        xs = outs
    return report
