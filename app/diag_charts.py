"""Chart builders for the diagnostics page: pure functions from qroar.diagnostics tables to Plotly figures.

Ratios (TIR) use a diverging scale centred at 1, differences one centred at 0, errors a sequential one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.charts import FONT, TRAINED_COLOUR, length_label, variant_colour

DIVERGING = "RdBu_r"  # blue below the centre, red above
SEQUENTIAL = "Viridis"
BAND_SHADES = ("rgba(31,95,174,0.07)", "rgba(0,0,0,0)")


def _style(fig: go.Figure, height: int) -> go.Figure:
    fig.update_layout(template="plotly_white", height=height, font=dict(family=FONT, size=13),
                      margin=dict(l=60, r=20, t=60, b=50),
                      legend=dict(orientation="h", yanchor="bottom", y=1.04, xanchor="left", x=0))
    return fig


def band_label(b: int) -> str:
    return f"b{int(b)}"


# ----------------------------------------------------------------------------- bands and IP


def bands_figure(pairs: pd.DataFrame, trained_context: int | None = None, height: int = 440) -> go.Figure:
    """Wavelength per RoPE pair before and after PI (log y), band edges shaded, the trained context
    as a line, and s_j on a second axis."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    hover = "pair %{x}: %{y:,.1f} tokens per turn<extra></extra>"
    fig.add_trace(go.Scatter(x=pairs.j, y=pairs.wavelength, name="wavelength before PI", mode="lines+markers",
                             line=dict(color=variant_colour("fp"), width=2), marker=dict(size=4), hovertemplate=hover))
    fig.add_trace(go.Scatter(x=pairs.j, y=pairs.wavelength_after, name="wavelength after PI", mode="lines+markers",
                             line=dict(color=variant_colour("quant"), width=2), marker=dict(size=4), hovertemplate=hover))
    fig.add_trace(go.Scatter(x=pairs.j, y=pairs.s, name="s_j = omega / inv_freq", mode="lines",
                             line=dict(color="#555555", width=1.5, dash="dot"),
                             hovertemplate="pair %{x}: s = %{y:.3f}x<extra></extra>"), secondary_y=True)
    for b, d in pairs.groupby("band"):
        fig.add_vrect(x0=d.j.min() - 0.5, x1=d.j.max() + 0.5, fillcolor=BAND_SHADES[int(b) % 2], line_width=0, layer="below",
                      annotation_text=band_label(b), annotation_position="top left", annotation_font_size=10)
    if trained_context:
        fig.add_hline(y=trained_context, line_dash="dash", line_color=TRAINED_COLOUR, line_width=1)
        # annotations on a log axis take log10 of the position (shapes take the value itself)
        fig.add_annotation(x=1, xref="x domain", y=math.log10(trained_context), yref="y", showarrow=False,
                           text=f"trained context {length_label(trained_context)}", xanchor="right", yanchor="bottom",
                           font=dict(size=11, color=TRAINED_COLOUR))
    fig.update_xaxes(title_text="RoPE pair j (high frequency -> low)")
    fig.update_yaxes(title_text="wavelength (tokens, log)", type="log", dtick=1, secondary_y=False)
    fig.update_yaxes(title_text="interpolation scale s_j", secondary_y=True, rangemode="tozero", showgrid=False,
                     tickformat=".3~g", nticks=6)
    return _style(fig, height)


def ip_heatmap(ip: pd.DataFrame, trained_context: int | None = None, height: int = 380) -> go.Figure:
    """Band x target length, colour = log10 of the band's mean Interpolation Pressure (hover: mean and max)."""
    mean = ip.pivot(index="band", columns="length", values="ip_mean").sort_index()
    mx = ip.pivot(index="band", columns="length", values="ip_max").reindex_like(mean)
    xs = [length_label(n) + (" (trained)" if n == trained_context else "") for n in mean.columns]
    fig = go.Figure(go.Heatmap(
        z=np.log10(mean.to_numpy().clip(min=1e-12)), x=xs, y=[band_label(b) for b in mean.index],
        customdata=np.dstack([mean.to_numpy(), mx.to_numpy()]), colorscale=SEQUENTIAL,
        colorbar=dict(title="log10 IP"),
        hovertemplate="band %{y}, D = %{x} tokens<br>IP mean %{customdata[0]:.4g} rad per unit scale"
                      "<br>IP max %{customdata[1]:.4g}<extra></extra>"))
    fig.update_xaxes(title_text="target length D (tokens)", type="category")
    fig.update_yaxes(title_text="band (b0 = highest frequency)", autorange="reversed")
    return _style(fig, height)


# ----------------------------------------------------------------------------- TIR and quant error


def _grid(df: pd.DataFrame, value: str) -> pd.DataFrame:
    return df.pivot(index="layer", columns="band", values=value).sort_index()


def tir_heatmaps(tir: pd.DataFrame, kind: str = "W", height: int = 560) -> go.Figure:
    """Layer x band TIR for q (top) and k (bottom): full precision, quantized (ratio, centred at 1) and
    their difference quantized - full precision (centred at 0)."""
    t = tir[tir.kind == kind]
    if t.empty:
        raise ValueError(f"no TIR_{kind} rows to plot")
    titles = [f"{p}: {c}" for p in ("q", "k") for c in ("full precision", "quantized", "quantized - full precision")]
    fig = make_subplots(rows=2, cols=3, subplot_titles=titles, horizontal_spacing=0.07, vertical_spacing=0.14,
                        shared_yaxes=True)
    ratios = t.tir.replace([np.inf, -np.inf], np.nan)
    spread = float(np.nanmax(np.abs(np.log(ratios.clip(lower=1e-6))))) if ratios.notna().any() else 0.1
    lo, hi = math.exp(-max(spread, 0.01)), math.exp(max(spread, 0.01))
    grids = {}
    for proj in ("q", "k"):
        tp = t[t.proj == proj]
        fp, qz = _grid(tp[tp.variant == "fp"], "tir"), _grid(tp[tp.variant == "quant"], "tir")
        grids[proj] = (fp, qz, qz - fp)
    dmax = max([float(np.nanmax(np.abs(g[2].to_numpy()))) for g in grids.values() if g[2].size] + [1e-9])
    for r, proj in enumerate(("q", "k"), start=1):
        for c, z in enumerate(grids[proj], start=1):
            is_diff = c == 3
            bar = (r, c) == ((2, 3) if is_diff else (1, 1))  # one colour bar per scale, both on the right
            fig.add_trace(go.Heatmap(
                z=z.to_numpy(), x=[band_label(b) for b in z.columns], y=[str(i) for i in z.index],
                colorscale=DIVERGING, zmid=0 if is_diff else 1,
                zmin=-dmax if is_diff else lo, zmax=dmax if is_diff else hi, showscale=bar,
                colorbar=dict(title="quant - fp" if is_diff else "TIR", x=1.02, len=0.42, y=0.22 if is_diff else 0.78),
                hovertemplate=f"{proj}, layer %{{y}}, band %{{x}}<br>"
                              + ("TIR quantized - full precision: %{z:+.3f}" if is_diff else "TIR (long/short tail): %{z:.3f}x")
                              + "<extra></extra>"), row=r, col=c)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_yaxes(title_text="layer", col=1)
    return _style(fig, height)


def quant_error_heatmap(qe: pd.DataFrame, height: int = 420) -> go.Figure:
    """Layer x band relative Frobenius error ||Q(W_b) - W_b|| / ||W_b|| of W_Q and W_K rows, in percent."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("W_Q", "W_K"), shared_yaxes=True, horizontal_spacing=0.06)
    zmin, zmax = float(qe.rel_err.min() * 100), float(qe.rel_err.max() * 100)
    zmax = zmax if zmax > zmin else zmin + 1.0  # the colour range spans the data, not 0..max
    for c, proj in enumerate(("q", "k"), start=1):
        z = _grid(qe[qe.proj == proj], "rel_err") * 100
        fig.add_trace(go.Heatmap(z=z.to_numpy(), x=[band_label(b) for b in z.columns], y=[str(i) for i in z.index],
                                 colorscale=SEQUENTIAL, zmin=zmin, zmax=zmax, showscale=c == 2,
                                 colorbar=dict(title="rel. error (%)"),
                                 hovertemplate=f"W_{proj.upper()}, layer %{{y}}, band %{{x}}<br>"
                                               "relative error %{z:.2f}%<extra></extra>"), row=1, col=c)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_yaxes(title_text="layer", col=1)
    return _style(fig, height)


# ----------------------------------------------------------------------------- logit noise


def _bucket_label(lo: int, hi: int) -> str:
    return length_label(lo) if lo == hi else f"{length_label(lo)}-{length_label(hi)}"


def noise_heatmap(noise: pd.DataFrame, mode: str = "isolated", value: str = "rel_err", height: int = 400) -> go.Figure:
    """Band x relative-distance bucket: logit error (RMS, or RMS relative to the full-precision band logit)."""
    d = noise[noise["mode"] == mode].sort_values(["bucket_lo", "band"])
    if d.empty:
        raise ValueError(f"no logit-noise rows for mode {mode!r}")
    z = d.pivot(index="band", columns="bucket_lo", values=value).sort_index()
    buckets = d.drop_duplicates("bucket_lo").set_index("bucket_lo").bucket_hi
    rel = value == "rel_err"
    fig = go.Figure(go.Heatmap(
        z=z.to_numpy() * (100 if rel else 1), x=[_bucket_label(lo, buckets[lo]) for lo in z.columns],
        y=[band_label(b) for b in z.index], colorscale=SEQUENTIAL,
        colorbar=dict(title="RMS error / RMS logit (%)" if rel else "RMS error"),
        hovertemplate="band %{y}, distance %{x} tokens<br>"
                      + ("RMS logit error %{z:.2f}% of the band's RMS logit" if rel else "RMS logit error %{z:.4g} (logit units)")
                      + "<extra></extra>"))
    fig.update_xaxes(title_text="query-key distance (tokens)", type="category")
    fig.update_yaxes(title_text="band (b0 = highest frequency)", autorange="reversed")
    return _style(fig, height)


def noise_lines(noise: pd.DataFrame, mode: str = "isolated", value: str = "rel_err", height: int = 400) -> go.Figure:
    """One line per band: logit error against distance (bucket geometric centre, log x)."""
    d = noise[noise["mode"] == mode]
    if d.empty:
        raise ValueError(f"no logit-noise rows for mode {mode!r}")
    rel = value == "rel_err"
    fig = go.Figure()
    bands = sorted(d.band.unique())
    colours = [f"hsl({int(240 - 240 * i / max(len(bands) - 1, 1))},65%,45%)" for i in range(len(bands))]
    for b, colour in zip(bands, colours):
        g = d[d.band == b].sort_values("bucket_lo")
        x = np.sqrt(g.bucket_lo * g.bucket_hi)
        fig.add_trace(go.Scatter(
            x=x, y=g[value] * (100 if rel else 1), name=band_label(b), mode="lines+markers", line=dict(color=colour),
            customdata=np.stack([g.bucket_lo, g.bucket_hi], axis=1),
            hovertemplate=f"{band_label(b)}, distance %{{customdata[0]}}-%{{customdata[1]}} tokens: "
                          + ("%{y:.2f}%" if rel else "%{y:.4g}") + "<extra></extra>"))
    lo, hi = float(np.sqrt(d.bucket_lo * d.bucket_hi).min()), float(np.sqrt(d.bucket_lo * d.bucket_hi).max())
    ticks = [2 ** k for k in range(int(np.floor(np.log2(lo))), int(np.ceil(np.log2(hi))) + 1)]
    fig.update_xaxes(title_text="query-key distance (tokens, log)", type="log",
                     range=[np.log10(lo) - 0.1, np.log10(hi) + 0.1], tickvals=ticks, ticktext=[length_label(t) for t in ticks])
    fig.update_yaxes(title_text="RMS error / RMS logit (%)" if rel else "RMS logit error", rangemode="tozero")
    return _style(fig, height)


def figures(tables: dict, trained_context: int | None = None) -> dict[str, go.Figure]:
    """Every diagnostics figure for a DiagResult's tables, by name (used by the CLI and the report)."""
    figs = {"bands": bands_figure(tables["pairs"], trained_context), "ip": ip_heatmap(tables["ip"], trained_context)}
    for kind in ("W", "A"):
        if (tables["tir"].kind == kind).any():
            figs[f"tir_{kind}"] = tir_heatmaps(tables["tir"], kind)
    figs["quant_error"] = quant_error_heatmap(tables["quant_error"])
    pooled = tables["logit_noise_pooled"]
    for mode in ("isolated", "accumulated"):
        if (pooled["mode"] == mode).any():
            figs[f"logit_noise_{mode}"] = noise_heatmap(pooled, mode)
            figs[f"logit_noise_{mode}_lines"] = noise_lines(pooled, mode)
    return figs
