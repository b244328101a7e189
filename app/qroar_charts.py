"""Chart builders for the Q-ROAR pages (Tune, Search, Export): pure functions from DataFrames to Plotly figures.

Variants: "fp" (full precision), "quant" (quantized, PTQ), "scaled" (quantized + per-band scales).
Relative changes are in percent of perplexity: 100 * (ppl_a / ppl_b - 1), negative = better.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.charts import VARIANT_STYLE, _length_axis, _style, _trained_line

STYLE = {  # variant -> (label, colour)
    "fp": ("FP (full precision)", VARIANT_STYLE["fp"][1]),
    "quant": ("PTQ (quantized)", VARIANT_STYLE["quant"][1]),
    "scaled": ("PTQ + scales", VARIANT_STYLE["qroar"][1]),
    "fp_scaled": ("FP + scales (control)", "#8e6cc8"),
}
PREVIOUS_COLOUR = "#9e9e9e"
WINDOW_COLOUR = "#555555"
REJECTED_COLOUR = "#c62828"


def label(v: str) -> str:
    return STYLE.get(v, (v, None))[0]


def change_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per length: perplexity of each variant present, PTQ vs FP and scaled vs PTQ in %."""
    wide = summary.pivot(index="length", columns="variant", values="ppl").sort_index()
    out = pd.DataFrame({"length": wide.index.astype(int)})
    for v in ("fp", "quant", "scaled"):
        if v in wide:
            out[f"ppl {v}"] = wide[v].to_numpy()
    if {"fp", "quant"} <= set(wide):
        out["PTQ vs FP %"] = (100 * (wide["quant"] / wide["fp"] - 1)).to_numpy()
    if {"quant", "scaled"} <= set(wide):
        out["scaled vs PTQ %"] = (100 * (wide["scaled"] / wide["quant"] - 1)).to_numpy()
    return out


def tune_figure(summary: pd.DataFrame, trained_context: int | None = None, previous: pd.DataFrame | None = None,
                height: int = 560) -> go.Figure:
    """Perplexity vs context length for FP, PTQ and PTQ + scales (top) and PTQ + scales vs PTQ in % (bottom).

    `previous`: an earlier summary whose scaled curve is drawn dashed for comparison.
    """
    if summary.empty:
        raise ValueError("no perplexity rows to plot")
    has_change = {"quant", "scaled"} <= set(summary["variant"])
    rows = 2 if has_change else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        row_heights=[0.62, 0.38] if has_change else [1.0],
                        subplot_titles=("Perplexity", "PTQ + scales vs PTQ (negative = better)")[:rows])
    lengths = sorted({int(n) for n in summary["length"]})
    prev = None
    if previous is not None and (previous["variant"] == "scaled").any():
        prev = previous[previous["variant"] == "scaled"].sort_values("length")
        fig.add_trace(go.Scatter(x=prev["length"], y=prev["ppl"], name="previous scales", mode="lines+markers",
                                 line=dict(color=PREVIOUS_COLOUR, width=1.5, dash="dash"), marker=dict(size=6),
                                 hovertemplate="previous scales: %{y:.4f}<extra></extra>"), row=1, col=1)
    for v in ("fp", "fp_scaled", "quant", "scaled"):
        d = summary[summary["variant"] == v].sort_values("length")
        if d.empty:
            continue
        name, colour = STYLE[v]
        wide = v == "quant"  # drawn under PTQ + scales: wider, so it shows where the two coincide
        fig.add_trace(go.Scatter(x=d["length"], y=d["ppl"], name=name, mode="lines+markers",
                                 line=dict(color=colour, width=6 if wide else 2.5, dash={"fp": "dot", "fp_scaled": "dash"}.get(v)),
                                 marker=dict(size=13 if wide else 8),
                                 hovertemplate=f"{name}: %{{y:.4f}}<extra></extra>"), row=1, col=1)
    if has_change:
        t = change_table(summary)
        fig.add_trace(go.Scatter(x=t["length"], y=t["scaled vs PTQ %"], name="change vs PTQ", showlegend=False,
                                 mode="lines+markers", line=dict(color="#9e9e9e", width=1.5),  # neutral: the markers say better/worse
                                 marker=dict(size=9, symbol="diamond",
                                             color=[STYLE["scaled"][1] if c <= 0 else REJECTED_COLOUR for c in t["scaled vs PTQ %"]]),
                                 hovertemplate="PTQ + scales vs PTQ: %{y:+.3f}%<extra></extra>"), row=2, col=1)
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
                         marker_color=[STYLE["scaled"][1] if x >= 1 else STYLE["quant"][1] for x in g],
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
    palette = (STYLE["scaled"][1], "#1f5fae")
    hover = "band %{customdata[0]}, g = %{customdata[1]:.4f}: %{y:+.3f}% on %{customdata[2]} document(s)<extra></extra>"
    for s, d in h.groupby("sweep"):
        ok = d[d["guard_ok"].astype(bool)]
        fig.add_trace(go.Scatter(x=ok["x"], y=ok["obj_pct"], mode="markers", name=f"sweep {int(s) + 1}",
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
    if chosen is not None:
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
