"""Training plots: a run's metrics.jsonl drawn as PNGs beside it.

Three pictures answer the questions one asks of an MoE run:
    loss.png         is it learning?  train CE (raw and smoothed), MTP loss, validation loss,
                     next to the learning rate and gradient norm that drive them;
    expert_load.png  do the experts share the work?  per MoE layer, every expert's share of the
                     token assignments relative to uniform (1.0 = balanced), over the steps;
    max_vio.png      how far is the busiest expert from balance?  MaxVio per layer.
matplotlib is optional (the `plot` extra): without it nothing is drawn and nothing fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..durable import atomic_write

EMA_ALPHA = 0.05
MAX_COLUMNS = 400  # heatmap width cap: beyond this, consecutive steps are averaged into one column


def read_metrics(path) -> tuple[list[dict], list[dict]]:
    """(train records, val records) of a metrics.jsonl, in file order; other kinds are ignored."""
    path = Path(path)
    text = path.read_text(errors="replace")  # a torn multi-byte character must not fail the whole file
    lines = [(i, s) for i, s in enumerate(text.splitlines(), start=1) if s.strip()]
    train, val = [], []
    for n, (lineno, line) in enumerate(lines):
        try:
            rec, err = json.loads(line), None
        except ValueError as e:
            rec, err = None, e
        if not isinstance(rec, dict):
            if n == len(lines) - 1:  # a crash mid-write leaves a torn last line: the run up to it is still good
                break
            raise ValueError(f"{path}:{lineno}: garbled metrics record ({err or 'not a JSON object'})") from err
        if rec.get("kind") == "train":
            train.append(rec)
        elif rec.get("kind") == "val":
            val.append(rec)
    return train, val


def write_plots(run_dir) -> list[Path]:
    """Draw run_dir/metrics.jsonl into PNGs in run_dir; the paths written ([] without matplotlib or data)."""
    try:
        import matplotlib  # noqa: F401  (probe: the figure helpers import what they draw with)
    except ImportError:
        return []
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir / "metrics.jsonl")
    if not train:
        return []
    # Figure objects rather than pyplot: no global figure registry to leak into and no backend to
    # switch under a notebook that called us (Figure.savefig renders PNGs through Agg by itself).
    written = [_save(_loss_figure(train, val), run_dir / "loss.png")]
    layers = layer_labels(train)
    if layers:
        written.append(_save(_expert_load_figure(train, layers), run_dir / "expert_load.png"))
        written.append(_save(_max_vio_figure(train, layers), run_dir / "max_vio.png"))
    return written


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict], key: str, positive: bool = False) -> tuple[list, list]:
    """(steps, values) of `key`, dropping the null/NaN/inf entries skipped steps leave behind."""
    pts = [(r["step"], r[key]) for r in records if _finite(r.get(key)) and (not positive or r[key] > 0)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _ema(values: list[float], alpha: float = EMA_ALPHA) -> list[float]:
    """Bias-corrected EMA (as in Adam): an EMA seeded with the first value would pin the curve to the
    step-0 loss for ~1/alpha points while the real loss is falling fastest."""
    out, m = [], 0.0
    for t, v in enumerate(values, start=1):
        m += alpha * (v - m)
        out.append(m / (1 - (1 - alpha) ** t))
    return out


def layer_labels(train: list[dict]) -> list[str]:
    """A name per MoE layer of the records: "layer 3" in the main stack, "MTP" (or "MTP 1", "MTP 2", ...
    for several depths) for the multi-token-prediction blocks, which follow the main stack's indices."""
    # The layer list is fixed by the model, so any record that has one will do; the last is the likeliest to.
    rec = next((r for r in reversed(train) if r.get("moe_layers")), None)
    if rec is None:
        return []
    layers, main = rec["moe_layers"], rec.get("num_hidden_layers")
    if main is None:  # a log from before records said where the main stack ends
        return [f"layer {i}" for i in layers]
    depths = sum(i >= main for i in layers)
    return [f"layer {i}" if i < main else "MTP" if depths == 1 else f"MTP {i - main + 1}" for i in layers]


def _log_y(ax) -> None:
    """Log y axis with plain tick labels (0.5, 2, 20): quicker to read than 5×10⁻¹ on a training plot."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):  # LogFormatter's choice of which ticks to label, printed as plain numbers
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _loss_figure(train, val):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, ax_lr = fig.subplots(1, 2)

    ce_key = "ce" if any(_finite(r.get("ce")) for r in train) else "loss"
    steps, ce = _series(train, ce_key)
    if ce:
        ax.plot(steps, ce, color="C0", lw=0.6, alpha=0.3, label="train CE")
        ax.plot(steps, _ema(ce), color="C0", lw=1.6, label="train CE (EMA)")
    steps, mtp = _series(train, "mtp_loss")
    if mtp:
        ax.plot(steps, _ema(mtp), color="C1", lw=1.2, ls="--", label="MTP loss (EMA)")
    # periodic validation reads a fixed sample of the split; the final one ("full") reads all of it, so it
    # is drawn apart rather than joined to the sampled curve
    vsteps, vloss = _series([v for v in val if not v.get("full")], "val_loss")
    fsteps, floss = _series([v for v in val if v.get("full")], "val_loss")
    title = "loss"
    if vloss:
        ax.plot(vsteps, vloss, color="C3", marker="o", ms=4, lw=1.2, label="val loss (sample)")
    if floss:
        ax.plot(fsteps, floss, color="C3", marker="*", ms=10, lw=0, label="val loss (whole split)")
    if vloss or floss:
        last_step, last = max(zip(vsteps + fsteps, vloss + floss))
        title += f" (final val {last:.4f} @ step {last_step})"
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9)

    steps, lr = _series(train, "lr")
    handles = ax_lr.plot(steps, lr, color="C2", lw=1.4, label="learning rate")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate and gradient norm")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(alpha=0.3)
    steps, gn = _series(train, "grad_norm", positive=True)  # log axis: a zero norm has no place on it
    if gn:
        ax_gn = ax_lr.twinx()  # lr and grad norm differ by orders of magnitude: one axis each
        ax_gn.plot(steps, gn, color="C4", lw=0.5, alpha=0.3)
        handles += ax_gn.plot(steps, _ema(gn), color="C4", lw=1.2, label="grad norm (EMA; raw faint)")
        _log_y(ax_gn)
        ax_gn.set_ylabel("grad norm (log)")
    ax_lr.legend(handles=handles, loc="best", fontsize="small", framealpha=0.9)
    return fig


def _share_matrix(train: list[dict], idx: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps (T,), load relative to uniform (T, E)) for the idx-th MoE layer, from the records that have it."""
    rows, steps = [], []
    for rec in train:
        shares = rec.get("expert_share") or []
        if idx < len(shares) and shares[idx] and all(_finite(v) for v in shares[idx]):
            if rows and len(shares[idx]) != len(rows[0]):
                continue
            rows.append(shares[idx])
            steps.append(rec["step"])
    if not rows:
        return np.zeros(0), np.zeros((0, 0))
    m = np.asarray(rows, dtype=np.float64)
    return np.asarray(steps, dtype=np.float64), m * m.shape[1]  # share / (1/E)


def _downsample(steps: np.ndarray, m: np.ndarray, max_cols: int = MAX_COLUMNS):
    """Average consecutive steps into bins so the heatmap has at most max_cols columns."""
    k = math.ceil(len(steps) / max_cols)
    if k <= 1:
        return steps, m
    bins = [slice(i, i + k) for i in range(0, len(steps), k)]
    return np.array([steps[b].mean() for b in bins]), np.stack([m[b].mean(axis=0) for b in bins])


def _expert_load_figure(train, layers):
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    data = [_downsample(*_share_matrix(train, i)) for i in range(len(layers))]
    vmax = max([2.0] + [float(m.max()) for _, m in data if m.size])
    # Diverging around 1.0 = perfectly balanced: blue experts starve, red ones are overloaded.
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax)
    ncols = min(len(layers), 4)
    nrows = math.ceil(len(layers) / ncols)
    fig = Figure(figsize=(3.4 * ncols + 1.2, 2.9 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    im = None
    for i, (ax, layer, (steps, m)) in enumerate(zip(axes, layers, data)):
        ax.set_title(layer)
        if i % ncols == 0:
            ax.set_ylabel("expert")
        if i >= len(layers) - ncols:
            ax.set_xlabel("step")
        if not m.size:
            continue
        # Columns are centred on their steps (logged steps are evenly spaced); a lone one gets width 1.
        half = (steps[-1] - steps[0]) / (len(steps) - 1) / 2 if len(steps) > 1 else 0.5
        im = ax.imshow(m.T, aspect="auto", origin="lower", interpolation="nearest", cmap="RdBu_r", norm=norm,
                       extent=(steps[0] - half, steps[-1] + half, -0.5, m.shape[1] - 0.5))
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[:len(layers)]), label="load / uniform", shrink=0.9)
    fig.suptitle("expert load relative to uniform")
    return fig


def _max_vio_figure(train, layers):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    all_positive = True
    for i, layer in enumerate(layers):
        pts = [(r["step"], r["max_vio"][i]) for r in train
               if i < len(r.get("max_vio") or []) and _finite(r["max_vio"][i])]
        if not pts:
            continue
        vals = [v for _, v in pts]
        all_positive &= min(vals) > 0
        ax.plot([s for s, _ in pts], _ema(vals), lw=1.3, label=layer)
    if all_positive and ax.lines:  # a perfectly balanced step has MaxVio 0, which a log axis cannot show
        _log_y(ax)
    ax.set(xlabel="step", ylabel="MaxVio = max load / mean load − 1", title="MaxVio per MoE layer (EMA)")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize="small", ncol=max(1, len(layers) // 8))
    return fig


def _save(fig, path: Path) -> Path:
    """Write atomically: a reader (or a crash) never sees a half-written PNG under the final name."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path
