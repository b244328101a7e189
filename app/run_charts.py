"""Chart builders that overlay runs: pure functions from tidy DataFrames with a `run` column (app.runs
curves_frame / diagnostics_frame) to Plotly figures. One colour per run; within a run, one line style
per variant (full precision solid, quantized dashed, scaled dotted), so the legend reads "run · variant".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.charts import FONT, TRAINED_COLOUR, length_label, variant_label

RUN_COLOURS = ("#1f5fae", "#d9622b", "#2a9d5c", "#7b4fa0", "#8c6d31", "#c2185b", "#00838f", "#555555")
VARIANT_DASH = {"fp": "solid", "quant": "dash", "quant_scaled": "dot", "qroar": "dot", "fp_scaled": "dashdot"}
PANELS_PER_ROW = 4  # side-by-side panels before wrapping to a new row
EXTRA_LABELS = {"quant_scaled": "quantized + scales", "fp_scaled": "full precision + scales"}


def run_colour(i: int) -> str:
    return RUN_COLOURS[i % len(RUN_COLOURS)]


def _label(v: str) -> str:
    return EXTRA_LABELS.get(v) or variant_label(v)


def _runs(df: pd.DataFrame) -> list[str]:
    if df.empty:
        raise ValueError("no runs to plot")
    return list(dict.fromkeys(df["run"]))


def _style(fig: go.Figure, height: int) -> go.Figure:
    fig.update_layout(template="plotly_white", height=height, font=dict(family=FONT, size=13),
                      margin=dict(l=60, r=20, t=60, b=50), hovermode="closest",
                      legend=dict(orientation="h", yanchor="bottom", y=1.04, xanchor="left", x=0))
    return fig


def perplexity_overlay(curves: pd.DataFrame, trained_context: int | None = None, log_y: bool = False,
                       height: int = 520) -> go.Figure:
    """Perplexity against context length: one line per run and variant (`curves`: run, variant, length, ppl)."""
    fig = go.Figure()
    lengths = sorted({int(n) for n in curves["length"]}) if len(curves) else []
    for i, run in enumerate(_runs(curves)):
        d = curves[curves["run"] == run]
        for v in dict.fromkeys(d["variant"]):
            dv = d[d["variant"] == v].sort_values("length")
            name = f"{run} · {_label(v)}"
            fig.add_trace(go.Scatter(
                x=dv["length"], y=dv["ppl"], name=name, legendgroup=run, mode="lines+markers",
                line=dict(color=run_colour(i), width=2.5, dash=VARIANT_DASH.get(v, "longdash")), marker=dict(size=7),
                hovertemplate=f"{name}<br>length %{{x}}: perplexity %{{y:.3f}}<extra></extra>"))
    ends = lengths + ([trained_context] if trained_context else [])
    lo, hi = math.log10(min(ends)), math.log10(max(ends))
    pad = max(0.06 * (hi - lo), 0.05)
    fig.update_xaxes(type="log", tickvals=lengths, ticktext=[length_label(n) for n in lengths], range=[lo - pad, hi + pad],
                     title_text="context length (tokens)", showgrid=True)
    fig.update_yaxes(title_text="perplexity" + (" (log)" if log_y else ""), type="log" if log_y else "linear")
    if trained_context:
        fig.add_vline(x=trained_context, line_dash="dash", line_color=TRAINED_COLOUR, line_width=1)
        fig.add_annotation(x=math.log10(trained_context), xref="x", y=1.0, yref="y domain", showarrow=False,
                           text=f"trained context {length_label(trained_context)}", xanchor="left", yanchor="top",
                           xshift=4, font=dict(size=11, color=TRAINED_COLOUR))
    return _style(fig, height)


def tir_overlay(tir: pd.DataFrame, kind: str = "W", height: int = 440) -> go.Figure:
    """Median Tail Inflation Ratio over layers per band, q (left) and k (right): one line per run and variant."""
    t = tir[tir["kind"] == kind] if len(tir) else tir
    if t.empty:
        raise ValueError(f"no TIR_{kind} rows to plot")
    med = t.groupby(["run", "variant", "proj", "band"], sort=False)["tir"].median().reset_index()
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"q: TIR_{kind}", f"k: TIR_{kind}"), shared_yaxes=True,
                        horizontal_spacing=0.06)
    for i, run in enumerate(_runs(t)):
        for v in dict.fromkeys(med[med["run"] == run]["variant"]):
            name = f"{run} · {_label(v)}"
            for c, proj in enumerate(("q", "k"), start=1):
                d = med[(med["run"] == run) & (med["variant"] == v) & (med["proj"] == proj)].sort_values("band")
                fig.add_trace(go.Scatter(
                    x=[f"b{int(b)}" for b in d["band"]], y=d["tir"], name=name, legendgroup=name, showlegend=c == 1,
                    mode="lines+markers", line=dict(color=run_colour(i), width=2, dash=VARIANT_DASH.get(v, "longdash")),
                    hovertemplate=f"{name}, {proj}, band %{{x}}: TIR %{{y:.3f}}x<extra></extra>"), row=1, col=c)
    fig.add_hline(y=1, line_color="#bbbbbb", line_width=1)
    fig.update_xaxes(title_text="band (b0 = highest frequency)", type="category")
    fig.update_yaxes(title_text="TIR, median over layers", col=1)
    return _style(fig, height)


def noise_overlay(noise: pd.DataFrame, mode: str = "isolated", value: str = "rel_err", height: int = 420) -> go.Figure:
    """Logit noise against query-key distance, one panel per run side by side (same y axis), one line per band
    in the same colour in every panel (`noise`: a pooled logit-noise table with a run column)."""
    d = noise[noise["mode"] == mode] if len(noise) else noise
    if d.empty:
        raise ValueError(f"no logit-noise rows for mode {mode!r}")
    runs = _runs(d)
    rel = value == "rel_err"
    cols = min(len(runs), PANELS_PER_ROW)
    rows = math.ceil(len(runs) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=runs, shared_yaxes="all", horizontal_spacing=0.04,
                        vertical_spacing=min(0.12, 0.5 / rows))
    bands = sorted(d["band"].unique())
    colours = {b: f"hsl({int(240 - 240 * i / max(len(bands) - 1, 1))},65%,45%)" for i, b in enumerate(bands)}
    centre = np.sqrt(d["bucket_lo"] * d["bucket_hi"])
    ticks = [2 ** k for k in range(int(np.floor(np.log2(centre.min()))), int(np.ceil(np.log2(centre.max()))) + 1)]
    shown = set()  # a band's legend entry once, whichever run has it first
    for i, run in enumerate(runs):
        r, c = i // cols + 1, i % cols + 1
        for b in bands:
            g = d[(d["run"] == run) & (d["band"] == b)].sort_values("bucket_lo")
            if g.empty:
                continue
            fig.add_trace(go.Scatter(
                x=np.sqrt(g["bucket_lo"] * g["bucket_hi"]), y=g[value] * (100 if rel else 1), name=f"b{int(b)}",
                legendgroup=f"b{int(b)}", showlegend=b not in shown, mode="lines+markers", line=dict(color=colours[b]),
                hovertemplate=f"{run}, b{int(b)}, distance ~%{{x:.0f}} tokens: " + ("%{y:.2f}%" if rel else "%{y:.4g}")
                              + "<extra></extra>"), row=r, col=c)
            shown.add(b)
        fig.update_xaxes(type="log", tickvals=ticks, ticktext=[length_label(t) for t in ticks],
                         title_text="distance (tokens, log)" if r == rows else None, row=r, col=c)
    fig.update_yaxes(title_text="RMS error / RMS logit (%)" if rel else "RMS logit error", rangemode="tozero", col=1)
    fig.update_layout(title=dict(text=f"Logit noise ({mode} inputs)", x=0, y=0.99, font=dict(size=14)))
    return _style(fig, height * rows)


def ip_overlay(ip: pd.DataFrame, length: int | None = None, height: int = 400) -> go.Figure:
    """Mean Interpolation Pressure per band (log y) at target length `length` (default: the longest length every
    run has, else each run's longest): one line per run."""
    runs = _runs(ip)
    if length is None:
        common = set.intersection(*(set(ip[ip["run"] == r]["length"]) for r in runs))
        length = max(common) if common else None
    fig = go.Figure()
    for i, run in enumerate(runs):
        d = ip[ip["run"] == run]
        at = length if length is not None and (d["length"] == length).any() else int(d["length"].max())
        d = d[d["length"] == at].sort_values("band")
        name = f"{run} · D={length_label(at)}"
        fig.add_trace(go.Scatter(x=[f"b{int(b)}" for b in d["band"]], y=d["ip_mean"], name=name, mode="lines+markers",
                                 line=dict(color=run_colour(i), width=2.5),
                                 hovertemplate=f"{name}, band %{{x}}: IP %{{y:.4g}}<extra></extra>"))
    fig.update_xaxes(title_text="band (b0 = highest frequency)", type="category")
    fig.update_yaxes(title_text="mean Interpolation Pressure (log)", type="log")
    return _style(fig, height)


OVERLAY_TITLES = {"perplexity": "Perplexity against context length",
                  "tir_W": "Tail Inflation Ratio of the projections (TIR_W)",
                  "tir_A": "Tail Inflation Ratio per axis after RoPE (TIR_A)",
                  "logit_noise_isolated": "Logit noise (isolated inputs)",
                  "logit_noise_accumulated": "Logit noise (accumulated inputs)", "ip": "Interpolation Pressure"}


def overlay_figures(curves: pd.DataFrame, tir: pd.DataFrame, noise: pd.DataFrame, ip: pd.DataFrame,
                    trained_context: int | None = None) -> dict[str, go.Figure]:
    """Every overlay the data allows, by name (used by the Runs page and the report)."""
    figs = {}
    if len(curves):
        figs["perplexity"] = perplexity_overlay(curves, trained_context)
    for kind in ("W", "A"):
        if len(tir) and (tir["kind"] == kind).any():
            figs[f"tir_{kind}"] = tir_overlay(tir, kind)
    for mode in ("isolated", "accumulated"):
        if len(noise) and (noise["mode"] == mode).any():
            figs[f"logit_noise_{mode}"] = noise_overlay(noise, mode)
    if len(ip):
        figs["ip"] = ip_overlay(ip)
    return figs
