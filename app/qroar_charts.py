"""Chart builders for the Q-ROAR pages (Tune, Search, Export): pure functions from DataFrames to Plotly figures.

Variants: "fp" (full precision), "quant" (quantized, PTQ), "quant_scaled" (quantized + per-band scales),
"fp_scaled" (full precision + the same scales: the control).
Relative changes are in percent of perplexity: 100 * (ppl_a / ppl_b - 1), negative = better.
Given the tidy per-document table (with each window's sums, qroar.perplexity), the charts and the
change table also carry 95% intervals: of each curve across windows, and of each change paired on
the same windows (qroar.perplexity.log_ppl_interval, paired_change).
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.charts import VARIANT_STYLE, _length_axis, _style, _trained_line
from qroar.perplexity import log_ppl_interval, paired_change, weighted_objective

STYLE = {  # variant -> (label, colour)
    "fp": ("FP (full precision)", VARIANT_STYLE["fp"][1]),
    "quant": ("PTQ (quantized)", VARIANT_STYLE["quant"][1]),
    "quant_scaled": ("PTQ + scales", VARIANT_STYLE["qroar"][1]),
    "fp_scaled": ("FP + scales (control)", "#8e6cc8"),
}
PREVIOUS_COLOUR = "#9e9e9e"
WINDOW_COLOUR = "#555555"
REJECTED_COLOUR = "#c62828"


def label(v: str) -> str:
    return STYLE.get(v, (v, None))[0]


CHANGES = {  # change column -> (base variant, changed variant)
    "PTQ vs FP %": ("fp", "quant"),
    "scaled vs PTQ %": ("quant", "quant_scaled"),
    "FP + scales vs FP %": ("fp", "fp_scaled"),  # the control: the same scales without quantization
}


def _variant(table: pd.DataFrame, v: str) -> pd.DataFrame:
    return table[table["variant"] == v]


def paired_changes(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each change of CHANGES whose two variants are in the tidy table: qroar.perplexity.paired_change."""
    have = set(table["variant"]) if table is not None and len(table) else set()
    return {name: paired_change(_variant(table, a), _variant(table, b))
            for name, (a, b) in CHANGES.items() if {a, b} <= have}


def interval_text(lo: float, hi: float, windows: int) -> str:
    """'-1.200% to +0.400%', or why there is no interval."""
    if windows < 2:
        return "none: 1 window"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f"{lo:+.3f}% to {hi:+.3f}%"


def change_table(summary: pd.DataFrame, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per length: perplexity of each variant present, PTQ vs FP, scaled vs PTQ and the control
    FP + scales vs FP in %. With the tidy per-document `table`: each change's 95% interval paired on the
    same windows ("<change> 95%", text) and the windows behind each length."""
    wide = summary.pivot(index="length", columns="variant", values="ppl").sort_index()
    out = pd.DataFrame({"length": wide.index.astype(int)})
    for v in ("fp", "quant", "quant_scaled", "fp_scaled"):
        if v in wide:
            out[f"ppl {v}"] = wide[v].to_numpy()
    paired = paired_changes(table) if table is not None else {}
    for name, (a, b) in CHANGES.items():
        if {a, b} <= set(wide):
            out[name] = (100 * (wide[b] / wide[a] - 1)).to_numpy()
            if name in paired:
                iv = paired[name].set_index("length").reindex(out["length"])
                out[name.replace("%", "95%")] = [interval_text(lo, hi, 0 if pd.isna(n) else int(n)) for lo, hi, n in
                                                 zip(iv["change_lo_pct"], iv["change_hi_pct"], iv["windows"])]
    if paired:
        out["windows"] = next(iter(paired.values())).set_index("length")["windows"].reindex(out["length"]).to_numpy()
    return out


CHANGE_ORDER = ("length", "scaled vs PTQ %", "scaled vs PTQ 95%", "FP + scales vs FP %", "FP + scales vs FP 95%",
                "ppl fp", "ppl quant", "ppl quant_scaled", "ppl fp_scaled", "PTQ vs FP %", "PTQ vs FP 95%", "windows")
CHANGE_LABELS = {  # change_table column -> what a reader sees
    "length": "length", "ppl fp": "FP", "ppl quant": "PTQ", "ppl quant_scaled": "PTQ + scales",
    "ppl fp_scaled": "FP + scales (control)", "PTQ vs FP %": "PTQ vs FP", "PTQ vs FP 95%": "PTQ vs FP, 95%",
    "scaled vs PTQ %": "PTQ + scales vs PTQ", "scaled vs PTQ 95%": "PTQ + scales vs PTQ, 95%",
    "FP + scales vs FP %": "control: FP + scales vs FP", "FP + scales vs FP 95%": "control, 95%",
    "windows": "windows",
}


def change_note(table: pd.DataFrame) -> str:
    """What the intervals of a change_table (and tune_figure) mean, or why there are none."""
    if "windows" not in table or table["windows"].isna().all():
        return ""
    n = int(table["windows"].min())
    if n < 2:
        return ("One window per length, so no interval: a window's perplexity is mostly a property of its text, and "
                "each length reads a different stretch of it, so the curves zig-zag by several percent. The changes "
                "compare variants on the same window. For 95% intervals, use 2 or more documents or windows per re-run.")
    text = (f"Shaded: PTQ's 95% interval across the {n} windows per length (texts differ far more than variants do). "
            "Changes: 95% intervals paired on the same windows, so the text both read cancels; a change whose "
            "interval holds 0 is within noise.")
    if "FP + scales vs FP %" in table:
        text += (" Control: the same scales on the full-precision model. Where FP + scales vs FP moves as much as "
                 "PTQ + scales vs PTQ, the gain is a per-band temperature effect, not a repair of quantization.")
    return text


def control_change(objective: dict, heldout: pd.DataFrame, weights: dict | None = None) -> float | None:
    """FP + scales vs FP on the held-out objective (relative perplexity change), or None when the result
    has no fp_scaled variant. `objective`: the search's {variant: objective}; `heldout`: its per-length rows."""
    if "fp_scaled" in objective and "fp" in objective:
        return math.exp(objective["fp_scaled"] - objective["fp"]) - 1
    if heldout is None or not (heldout["variant"] == "fp_scaled").any() or not (heldout["variant"] == "fp").any():
        return None
    obj = {v: weighted_objective(_variant(heldout, v), weights) for v in ("fp", "fp_scaled")}
    return math.exp(obj["fp_scaled"] - obj["fp"]) - 1


def _bars(lo, hi, mid) -> dict | None:
    """Plotly error bars from interval bounds around mid (None when no bound is finite)."""
    up = [h - m if math.isfinite(h) else None for h, m in zip(hi, mid)]
    down = [m - lo_ if math.isfinite(lo_) else None for lo_, m in zip(lo, mid)]
    if all(u is None for u in up):
        return None
    return dict(type="data", symmetric=False, array=up, arrayminus=down, thickness=1.5, width=5)


def tune_figure(summary: pd.DataFrame, trained_context: int | None = None, previous: pd.DataFrame | None = None,
                height: int = 560, table: pd.DataFrame | None = None) -> go.Figure:
    """Perplexity vs context length for FP, PTQ and PTQ + scales (top) and PTQ + scales vs PTQ in % (bottom),
    with the control FP + scales vs FP there too when it was measured.

    `previous`: an earlier summary whose scaled curve is drawn dashed for comparison.
    `table`: the tidy per-document table; with it every curve carries its 95% interval across windows
    (top) and every change its interval paired on the same windows (bottom), where there are 2+ windows.
    """
    if summary.empty:
        raise ValueError("no perplexity rows to plot")
    has_change = {"quant", "quant_scaled"} <= set(summary["variant"])
    rows = 2 if has_change else 1
    change_title = ("PTQ + scales vs PTQ and the control FP + scales vs FP (negative = better)"
                    if {"fp", "fp_scaled"} <= set(summary["variant"]) else "PTQ + scales vs PTQ (negative = better)")
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        row_heights=[0.62, 0.38] if has_change else [1.0],
                        subplot_titles=("Perplexity", change_title)[:rows])
    lengths = sorted({int(n) for n in summary["length"]})
    prev = None
    if previous is not None and (previous["variant"] == "quant_scaled").any():
        prev = previous[previous["variant"] == "quant_scaled"].sort_values("length")
        fig.add_trace(go.Scatter(x=prev["length"], y=prev["ppl"], name="previous scales", mode="lines+markers",
                                 line=dict(color=PREVIOUS_COLOUR, width=1.5, dash="dash"), marker=dict(size=6),
                                 hovertemplate="previous scales: %{y:.4f}<extra></extra>"), row=1, col=1)
    intervals = {}  # variant -> its 95% interval across windows, per length of the summary
    if table is not None and len(table):
        for v in ("fp", "fp_scaled", "quant", "quant_scaled"):
            d = summary[summary["variant"] == v].sort_values("length")
            if len(d) and (table["variant"] == v).any():
                iv = log_ppl_interval(_variant(table, v)).set_index("length").reindex(d["length"])
                if iv["ppl_lo"].notna().any():
                    intervals[v] = iv
    ref = "quant" if "quant" in intervals else "fp" if "fp" in intervals else None
    if ref is not None:  # one band, not four: every variant reads the same windows, so their bands nearly coincide
        iv, name = intervals[ref], STYLE[ref][0]
        fill = "rgba(217,98,43,0.13)" if ref == "quant" else "rgba(31,95,174,0.12)"
        fig.add_trace(go.Scatter(x=list(iv.index), y=iv["ppl_lo"], mode="lines", line=dict(width=0), showlegend=False,
                                 hoverinfo="skip", legendgroup="band"), row=1, col=1)
        fig.add_trace(go.Scatter(x=list(iv.index), y=iv["ppl_hi"], mode="lines", line=dict(width=0), fill="tonexty",
                                 fillcolor=fill, name=f"{name.split(' (')[0]}: 95% across windows", hoverinfo="skip",
                                 legendgroup="band"), row=1, col=1)
    for v in ("fp", "fp_scaled", "quant", "quant_scaled"):
        d = summary[summary["variant"] == v].sort_values("length")
        if d.empty:
            continue
        name, colour = STYLE[v]
        wide = v == "quant"  # drawn under PTQ + scales: wider, so it shows where the two coincide
        hover, custom = f"{name}: %{{y:.4f}}", None
        if v in intervals:
            iv = intervals[v]
            custom = list(zip(iv["ppl_lo"], iv["ppl_hi"], iv["windows"]))
            hover += " (95%: %{customdata[0]:.4f}-%{customdata[1]:.4f} across %{customdata[2]} windows)"
        fig.add_trace(go.Scatter(x=d["length"], y=d["ppl"], name=name, mode="lines+markers",
                                 line=dict(color=colour, width=6 if wide else 2.5, dash={"fp": "dot", "fp_scaled": "dash"}.get(v)),
                                 marker=dict(size=13 if wide else 8), customdata=custom,
                                 hovertemplate=hover + "<extra></extra>"), row=1, col=1)
    if ref is not None:  # the curves stay readable: the band shows at most one curve-span beyond them
        ys = summary["ppl"].astype(float)
        lo_c, hi_c = float(ys.min()), float(ys.max())
        span = max(hi_c - lo_c, 0.02 * hi_c)
        band_lo, band_hi = float(intervals[ref]["ppl_lo"].min()), float(intervals[ref]["ppl_hi"].max())
        lo = max(min(band_lo, lo_c - 0.1 * span), lo_c - span, 0.0)
        hi = min(max(band_hi, hi_c + 0.1 * span), hi_c + span)
        fig.update_yaxes(range=[lo, hi], row=1, col=1)
    if has_change:
        t = change_table(summary)
        paired = paired_changes(table) if table is not None else {}
        for name, label_, colour, dash in (("scaled vs PTQ %", "PTQ + scales vs PTQ", "#9e9e9e", None),
                                           ("FP + scales vs FP %", "FP + scales vs FP (control)", STYLE["fp_scaled"][1], "dash")):
            if name not in t:
                continue
            bars, custom, hover = None, None, f"{label_}: %{{y:+.3f}}%"
            if name in paired:
                iv = paired[name].set_index("length").reindex(t["length"])
                bars = _bars(iv["change_lo_pct"], iv["change_hi_pct"], t[name])
                if bars is not None:
                    bars.update(color=colour if dash else "#616161")
                    custom = list(zip(iv["change_lo_pct"], iv["change_hi_pct"], iv["windows"]))
                    hover += " (95%: %{customdata[0]:+.3f}% to %{customdata[1]:+.3f}%, paired on %{customdata[2]} windows)"
            control = dash is not None
            fig.add_trace(go.Scatter(
                x=t["length"] * (1.03 if control else 1.0), y=t[name],  # the control a step right: bars stay apart
                name="change vs FP (control)" if control else "change vs PTQ", showlegend=control,
                mode="lines+markers", line=dict(color=colour, width=1.5, dash=dash),  # neutral: the markers say better/worse
                marker=dict(size=8 if control else 9, symbol="circle-open" if control else "diamond",
                            color=colour if control else [STYLE["quant_scaled"][1] if c <= 0 else REJECTED_COLOUR for c in t[name]]),
                error_y=bars, customdata=custom, hovertemplate=hover + "<extra></extra>"), row=2, col=1)
        if prev is not None and {"quant"} <= set(previous["variant"]):
            pt = change_table(previous)
            if "scaled vs PTQ %" in pt:
                fig.add_trace(go.Scatter(x=pt["length"], y=pt["scaled vs PTQ %"], name="previous change", showlegend=False,
                                         mode="markers", marker=dict(color=PREVIOUS_COLOUR, size=9, symbol="line-ew-open"),
                                         hovertemplate="previous scales: %{y:+.3f}%<extra></extra>"), row=2, col=1)
        fig.add_hline(y=0, line_color="#bbbbbb", line_width=1, row=2, col=1)
        fig.update_yaxes(title_text="change (%)", ticksuffix="%", row=2, col=1)
    fig.update_yaxes(title_text="perplexity", row=1, col=1)
    for r in range(1, rows + 1):
        _length_axis(fig, lengths, r, "context length (tokens)" if r == rows else None, trained_context)
    _trained_line(fig, trained_context, rows)
    return _style(fig, height)


def scales_figure(scales, windows: pd.DataFrame, folds: pd.DataFrame | None = None, height: int = 340) -> go.Figure:
    """Scale per band as a bar from 1 (left: below 1, right: above), the window G_b as error bars.

    `windows` has band, g_min, g_max (reason optional); `folds` (k-fold) has band and fold0, fold1, ... columns.
    """
    g = [float(x) for x in scales]
    w = windows.sort_values("band").reset_index(drop=True)
    if len(w) != len(g):
        raise ValueError(f"{len(g)} scales for {len(w)} windows")
    bands = [f"b{b}" for b in w["band"]]
    reasons = list(w["reason"]) if "reason" in w else [""] * len(w)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=bands, y=[x - 1 for x in g], base=[1.0] * len(g), name="scale g_b",
                         marker_color=[STYLE["quant_scaled"][1] if x >= 1 else STYLE["quant"][1] for x in g],
                         opacity=0.55, hoverinfo="skip"))
    fig.add_trace(go.Scatter(
        x=bands, y=g, mode="markers", name="g_b and window G_b", marker=dict(size=10, color="#222222", symbol="diamond"),
        error_y=dict(type="data", symmetric=False, array=(w["g_max"] - g).tolist(), arrayminus=(g - w["g_min"]).tolist(),
                     color=WINDOW_COLOUR, thickness=1.5, width=8),
        customdata=list(zip(w["g_min"], w["g_max"], reasons)),
        hovertemplate="%{x}: g = %{y:.4f}<br>window [%{customdata[0]:.4f}, %{customdata[1]:.4f}]<br>%{customdata[2]}<extra></extra>"))
    if folds is not None and len(folds):
        cols = [c for c in folds.columns if c.startswith("fold")]
        f = folds.sort_values("band")
        for i, c in enumerate(cols):
            fig.add_trace(go.Scatter(x=[f"b{b}" for b in f["band"]], y=f[c], mode="markers", name="k-fold choices",
                                     legendgroup="folds", showlegend=i == 0,
                                     marker=dict(size=7, color="#7b4fa0", symbol="circle-open"),
                                     hovertemplate=f"{c}: g = %{{y:.4f}}<extra></extra>"))
    fig.add_hline(y=1, line_color="#999999", line_width=1)
    fig.update_yaxes(title_text="scale g_b (1 = unchanged)")
    fig.update_xaxes(title_text="band (b0 = highest frequency)")
    fig = _style(fig, height)
    fig.update_layout(hovermode="closest", bargap=0.45)
    return fig


def is_per_layer(scales) -> bool:
    return scales is not None and len(scales) > 0 and isinstance(scales[0], (list, tuple))


def scales_table(scales) -> pd.DataFrame:
    """Shared scales: one row per band (band, scale g_b); per-layer ones: one row per layer, a column per band."""
    if is_per_layer(scales):
        t = pd.DataFrame([list(map(float, r)) for r in scales], columns=[f"b{b}" for b in range(len(scales[0]))])
        t.insert(0, "layer", range(len(scales)))
        return t
    return pd.DataFrame({"band": [f"b{b}" for b in range(len(scales))], "scale g_b": [float(g) for g in scales]})


def layer_scales_figure(scales, height: int | None = None) -> go.Figure:
    """Per-layer scales as a layer x band heatmap, coloured by log g around 1 (red: above 1, blue: below)."""
    g = [[float(x) for x in row] for row in scales]
    if not g or not all(len(r) == len(g[0]) for r in g):
        raise ValueError("per-layer scales need one list of band scales per layer, all of one length")
    z = [[math.log(x) for x in row] for row in g]
    lim = max(max(abs(v) for row in z for v in row), 1e-6)
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"b{b}" for b in range(len(g[0]))], y=[f"L{i}" for i in range(len(g))], customdata=g,
        zmin=-lim, zmax=lim, colorscale="RdBu_r", zmid=0,
        colorbar=dict(title="g", tickvals=[-lim, 0, lim], ticktext=[f"{math.exp(-lim):.3g}", "1", f"{math.exp(lim):.3g}"]),
        text=[[f"{x:.3f}" for x in row] for row in g], texttemplate="%{text}" if len(g) * len(g[0]) <= 160 else None,
        hovertemplate="layer %{y}, band %{x}: g = %{customdata:.4f}<extra></extra>"))
    fig.update_yaxes(title_text="layer", autorange="reversed")
    fig.update_xaxes(title_text="band (b0 = highest frequency)")
    fig = _style(fig, height or max(260, 40 + 22 * len(g)))
    fig.update_layout(hovermode="closest")
    return fig


def trace_positions(history: pd.DataFrame) -> pd.Series:
    """x of each tried candidate: its band, spread by the candidate's rank within the band (log g order)."""
    x = pd.Series(0.0, index=history.index)
    for _, d in history.groupby("band"):
        gs = sorted(d["g"].unique())
        n = len(gs)
        for i, idx in enumerate(d.index):
            rank = gs.index(d.at[idx, "g"])
            x[idx] = d.at[idx, "band"] + (rank - (n - 1) / 2) * (0.7 / max(n, 1))
    return x


def steps_figure(history: pd.DataFrame, height: int = 420) -> go.Figure:
    """A gradient search, step by step: the objective of each training minibatch (grey) and of each check on
    the held-back dev documents (the early-stopping split; red x: failed the short-context guard there).

    history: step, split ("train" | "val"), objective, guard_ok (as qroar.search records the "grad" strategy)."""
    h = history[history["step"].notna()]
    if h.empty:
        raise ValueError("no steps to plot")
    fig = go.Figure()
    tr = h[h["split"] == "train"]
    fig.add_trace(go.Scatter(x=tr["step"], y=tr["objective"], mode="lines+markers", name="training minibatch",
                             line=dict(color="#9e9e9e", width=1), marker=dict(size=5, color="#9e9e9e"),
                             hovertemplate="step %{x}: %{y:.5f}<extra>training minibatch</extra>"))
    va = h[h["split"] == "val"]
    ok = va["guard_ok"].astype(bool)
    fig.add_trace(go.Scatter(x=va["step"], y=va["objective"], mode="lines+markers", name="held-back dev documents",
                             line=dict(color=STYLE["quant_scaled"][1], width=2), marker=dict(size=8),
                             hovertemplate="step %{x}: %{y:.5f}<extra>held-back dev documents</extra>"))
    if (~ok).any():
        bad = va[~ok]
        fig.add_trace(go.Scatter(x=bad["step"], y=bad["objective"], mode="markers", name="failed the guard",
                                 marker=dict(size=12, symbol="x", color=REJECTED_COLOUR), hoverinfo="skip"))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="objective (lower = better)")
    fig = _style(fig, height)
    fig.update_layout(hovermode="closest")
    return fig


TRACE_CAPTION = ("Each candidate is compared with the scale it had to beat on the same documents: the band's "
                 "incumbent (exhaustive search: the best so far). With racing, a candidate dropped after 1 or 3 "
                 "documents is compared on those documents only; larger markers: more documents.")


def trace_changes(history: pd.DataFrame, baseline_objective: float, baseline_short: float) -> pd.DataFrame:
    """Per tried candidate, in %: obj_pct, its objective vs the incumbent's on the same documents (NaN when
    the guard rejected it), and short_pct, its shortest length vs the unscaled model's on those documents.

    history: as qroar.search records it; without incumbent_objective / unscaled_short_log_ppl (older
    results) the all-documents baselines given here stand in.
    """
    inc = history.get("incumbent_objective", pd.Series(baseline_objective, index=history.index))
    base = history.get("unscaled_short_log_ppl", pd.Series(baseline_short, index=history.index))
    obj = [100 * (math.exp(o - i) - 1) if pd.notna(o) and pd.notna(i) else float("nan")
           for o, i in zip(history["objective"], inc.fillna(baseline_objective))]
    short = [100 * (math.exp(s - b) - 1) for s, b in zip(history["short_log_ppl"], base.fillna(baseline_short))]
    return pd.DataFrame({"obj_pct": obj, "short_pct": short}, index=history.index)


def trace_figure(history: pd.DataFrame, baseline_objective: float, baseline_short: float, guard_tol: float,
                 chosen=None, height: int = 520) -> go.Figure:
    """The search, candidate by candidate: objective change vs the incumbent on the same documents (top;
    only candidates that passed the guard have one) and short-context change against the guard (bottom;
    rejected in red). Marker size: documents the candidate was scored on (racing stops most early).

    history: band, g, objective (NaN when rejected), short_log_ppl, guard_ok, sweep, docs, incumbent_objective,
    unscaled_short_log_ppl (as qroar.search records it; see trace_changes).
    """
    if history.empty:
        raise ValueError("no candidates to plot")
    h = history.copy()
    h["x"] = trace_positions(h)
    h[["obj_pct", "short_pct"]] = trace_changes(h, baseline_objective, baseline_short)
    docs = h["docs"] if "docs" in h else pd.Series(1, index=h.index)
    h["docs"] = docs.fillna(1).astype(int)
    h["size"] = 6 + 8 * (h["docs"] / h["docs"].max()) ** 0.5
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12, row_heights=[0.55, 0.45],
                        subplot_titles=("Objective vs the incumbent on the same documents (lower = better)",
                                        "Shortest length vs unscaled PTQ on the same documents (the guard)"))
    palette = (STYLE["quant_scaled"][1], "#1f5fae")
    hover = "band %{customdata[0]}, g = %{customdata[1]:.4f}: %{y:+.3f}% on %{customdata[2]} document(s)<extra></extra>"
    for s, d in h.groupby("sweep"):
        ok = d[d["guard_ok"].astype(bool)]
        refine = "group" in d and d["group"].notna().any()  # the per-layer strategy's refinement of layer groups
        fig.add_trace(go.Scatter(x=ok["x"], y=ok["obj_pct"], mode="markers",
                                 name="layer groups" if refine else f"sweep {int(s) + 1}",
                                 marker=dict(size=ok["size"], color=palette[int(s) % 2]),
                                 customdata=ok[["band", "g", "docs"]], hovertemplate=hover),
                      row=1, col=1)
    for ok, d in h.groupby(h["guard_ok"].astype(bool)):
        fig.add_trace(go.Scatter(x=d["x"], y=d["short_pct"], mode="markers",
                                 name="passed the guard" if ok else "rejected by the guard", showlegend=not ok,
                                 marker=dict(size=d["size"] if ok else d["size"] + 2, color="#9e9e9e" if ok else REJECTED_COLOUR,
                                             symbol="circle" if ok else "x"),
                                 customdata=d[["band", "g", "docs"]], hovertemplate=hover),
                      row=2, col=1)
    if chosen is not None and not is_per_layer(chosen):
        pick = [(b, float(g)) for b, g in enumerate(chosen) if float(g) != 1.0]
        sel = h[[any(r.band == b and abs(r.g - g) < 1e-12 for b, g in pick) for r in h.itertuples()]]
        sel = sel[sel["guard_ok"].astype(bool)].drop_duplicates("band", keep="last")
        if len(sel):
            fig.add_trace(go.Scatter(x=sel["x"], y=sel["obj_pct"], mode="markers", name="chosen",
                                     marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color="#111111", width=2)),
                                     hoverinfo="skip"), row=1, col=1)
    fig.add_hline(y=0, line_color="#bbbbbb", line_width=1, row=1, col=1)
    fig.add_hline(y=100 * guard_tol, line_color=REJECTED_COLOUR, line_dash="dash", line_width=1, row=2, col=1,
                  annotation_text=f"guard +{100 * guard_tol:g}%", annotation_position="top left",
                  annotation_font=dict(size=11, color=REJECTED_COLOUR))
    bands = sorted(int(b) for b in h["band"].unique())
    for r in (1, 2):
        fig.update_xaxes(tickvals=bands, ticktext=[f"b{b}" for b in bands], showgrid=False, row=r, col=1)
        fig.update_yaxes(ticksuffix="%", row=r, col=1)
    fig.update_xaxes(title_text="band (candidates left to right: smaller to larger g)", row=2, col=1)
    fig = _style(fig, height)
    fig.update_layout(hovermode="closest")
    return fig
