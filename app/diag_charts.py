"""Chart builders for the diagnostics page: pure functions from qroar.diagnostics tables to Plotly figures.

Ratios (TIR) use a red-blue diverging scale centred at 1 (symmetric in log, never narrower than
1/TIR_SPAN..TIR_SPAN), differences a purple-orange one centred at 0, errors a sequential one; every
heatmap has its own colour bar. Bands in line charts take distinct hues (a qualitative palette).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.charts import FONT, TRAINED_COLOUR, length_label, variant_colour

DIVERGING = "RdBu_r"  # ratios: blue below 1, red above
DIFFERENCE = "PuOr_r"  # differences: purple below 0, orange above (not the ratios' palette)
SEQUENTIAL = "Viridis"
BAND_SHADES = ("rgba(31,95,174,0.07)", "rgba(0,0,0,0)")
# distinct hues, one per band (up to 16): Tableau 10, then six more unlike any of them
BAND_COLOURS = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F",
                "#BCBD22", "#17BECF", "#222A2A", "#B68100", "#750D86", "#00A08B", "#FB00D1", "#6C7C32")
TIR_SPAN = 1.25  # the ratio colour range is at least [1/1.25, 1.25]: a few % off 1 stays pale
DIFF_SPAN = 0.02  # and the difference range at least +-0.02
RATIO_TICKS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
NOISE_MARK = "rgba(30,30,30,0.6)"


def _style(fig: go.Figure, height: int) -> go.Figure:
    fig.update_layout(template="plotly_white", height=height, font=dict(family=FONT, size=13),
                      margin=dict(l=60, r=20, t=60, b=50),
                      legend=dict(orientation="h", yanchor="bottom", y=1.04, xanchor="left", x=0))
    return fig


def band_label(b: int) -> str:
    return f"b{int(b)}"


def band_colour(i: int) -> str:
    return BAND_COLOURS[int(i) % len(BAND_COLOURS)]


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
    s_max = float(pairs.s.max()) if len(pairs) else 1.0
    fig.update_yaxes(title_text="interpolation scale s_j", secondary_y=True, showgrid=False, tickformat=".3~g",
                     range=[0, 1.08 * max(s_max, 1.0)], tickmode="auto", nticks=6)  # own ticks, not the log axis' grid
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


def _colourbar(fig: go.Figure, row: int, col: int, cols: int, title: str, **kw) -> dict:
    """A colour bar right of subplot (row, col), as tall as it."""
    n = (row - 1) * cols + col
    xd = fig.layout[f"xaxis{'' if n == 1 else n}"].domain
    yd = fig.layout[f"yaxis{'' if n == 1 else n}"].domain
    return dict(title=dict(text=title, side="top", font=dict(size=11)), x=xd[1] + 0.008, xanchor="left",
                y=(yd[0] + yd[1]) / 2, yanchor="middle", len=yd[1] - yd[0], thickness=10, tickfont=dict(size=10), **kw)


def ratio_span(ratios) -> float:
    """Half-width in log of the ratio colour range: the data's, but never under log TIR_SPAN."""
    r = pd.Series(ratios, dtype=float).replace([np.inf, -np.inf], np.nan)
    r = r[r > 0]
    spread = float(np.abs(np.log(r)).max()) if len(r) else 0.0
    return max(spread, math.log(TIR_SPAN))


def tir_heatmaps(tir: pd.DataFrame, kind: str = "W", height: int = 600) -> go.Figure:
    """Layer x band TIR for q (top) and k (bottom): full precision, quantized (ratio, log colour scale
    centred at 1) and their difference quantized - full precision (centred at 0). Cells whose 95%
    interval from the documents' spread holds 1 (differences: 0) carry a dot (within sampling noise)."""
    from qroar.diagnostics import tir_difference, tir_intervals

    t = tir[tir.kind == kind]
    if t.empty:
        raise ValueError(f"no TIR_{kind} rows to plot")
    t, diff = tir_intervals(t), tir_difference(t)
    titles = [f"{p}: {c}" for p in ("q", "k") for c in ("full precision", "quantized", "quantized - full precision")]
    fig = make_subplots(rows=2, cols=3, subplot_titles=titles, horizontal_spacing=0.11, vertical_spacing=0.16,
                        shared_yaxes=True)
    h = ratio_span(t.tir)
    ticks = [v for v in RATIO_TICKS if abs(math.log(v)) <= h + 1e-9]
    grids = {}
    for proj in ("q", "k"):
        tp = t[t.proj == proj]
        fp, qz = tp[tp.variant == "fp"], tp[tp.variant == "quant"]
        grids[proj] = (fp, qz, diff[diff.proj == proj])
    dmax = max([float(np.nanmax(np.abs(g[2]["diff"].to_numpy()))) for g in grids.values() if len(g[2])] + [DIFF_SPAN])
    marked = False
    for r, proj in enumerate(("q", "k"), start=1):
        for c, part in enumerate(grids[proj], start=1):
            if c == 3:
                z = _grid(part, "diff")
                lo, hi = _grid(part, "diff_lo").reindex_like(z), _grid(part, "diff_hi").reindex_like(z)
                fig.add_trace(go.Heatmap(
                    z=z.to_numpy(), x=[band_label(b) for b in z.columns], y=[str(i) for i in z.index],
                    customdata=np.dstack([lo.to_numpy(), hi.to_numpy()]),
                    colorscale=DIFFERENCE, zmid=0, zmin=-dmax, zmax=dmax,
                    colorbar=_colourbar(fig, r, c, 3, "quant - fp", tickformat="+.2~f"),
                    hovertemplate=f"{proj}, layer %{{y}}, band %{{x}}<br>TIR quantized - full precision: %{{z:+.3f}}"
                                  "<br>95% interval %{customdata[0]:+.3f} to %{customdata[1]:+.3f}<extra></extra>"),
                    row=r, col=c)
            else:
                z = _grid(part, "tir")
                lo, hi = _grid(part, "tir_lo").reindex_like(z), _grid(part, "tir_hi").reindex_like(z)
                docs = _grid(part, "docs").reindex_like(z)
                fig.add_trace(go.Heatmap(
                    z=np.log(z.to_numpy().clip(min=1e-12)), x=[band_label(b) for b in z.columns], y=[str(i) for i in z.index],
                    customdata=np.dstack([z.to_numpy(), lo.to_numpy(), hi.to_numpy(), docs.to_numpy()]),
                    colorscale=DIVERGING, zmid=0, zmin=-h, zmax=h,
                    colorbar=_colourbar(fig, r, c, 3, "TIR", tickvals=[math.log(v) for v in ticks],
                                        ticktext=[f"{v:g}" for v in ticks]),
                    hovertemplate=f"{proj}, layer %{{y}}, band %{{x}}<br>TIR (long/short tail): %{{customdata[0]:.3f}}x"
                                  "<br>95% interval %{customdata[1]:.3f}-%{customdata[2]:.3f} "
                                  "(spread of %{customdata[3]} documents)<extra></extra>"), row=r, col=c)
            quiet = part[part.within_noise]
            if len(quiet):
                fig.add_trace(go.Scatter(
                    x=[band_label(b) for b in quiet.band], y=[str(i) for i in quiet.layer], mode="markers",
                    name="within sampling noise (95% interval holds 1, or 0 for differences)", legendgroup="noise", showlegend=not marked,
                    marker=dict(symbol="circle", size=5, color=NOISE_MARK), hoverinfo="skip"), row=r, col=c)
                marked = True
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    fig.update_yaxes(title_text="layer", col=1)
    fig = _style(fig, height)
    fig.update_layout(margin=dict(r=60))
    return fig


def tir_sampling_note(tir: pd.DataFrame, kind: str = "W", eps: float | None = None) -> str:
    """What stands behind each TIR cell (tokens, values, documents) and how many are within sampling noise."""
    from qroar.diagnostics import tir_intervals

    t = tir[(tir.kind == kind) & (tir.variant == "fp")]
    if t.empty or "tokens_short" not in t:
        return "This result does not say how many tokens stand behind each cell (written by an older version): run it again."
    first = t.iloc[0]
    docs = int(t["docs"].max())
    short, long_ = int(first.tokens_short), int(first.tokens_long)
    per = {p: int(d.n_short.iloc[0] // max(d.tokens_short.iloc[0], 1)) for p, d in t.groupby("proj")}
    order = sorted(per, key=lambda p: p != "q")
    text = (f"Each cell: {short:,} short and {long_:,} long tokens from {docs} document{'s' if docs != 1 else ''}, one "
            f"value per token and row of the band ({', '.join(f'{per[p]} rows for {p}' for p in order)})")
    if eps:
        k = {p: math.floor(eps * short * per[p]) + 1 for p in order}
        text += f"; Q(1-{eps:g}) of the short side is its {' / '.join(f'{k[p]:,}th ({p})' for p in order)} largest value"
    if docs < 2:
        return text + (". One document gives no estimate of sampling noise: run with 2 or more documents "
                       "to see which cells could be 1 on other text.")
    iv = tir_intervals(tir[tir.kind == kind])
    ratio = iv[iv.variant.isin(["fp", "quant"])]
    width = float(np.nanmedian(np.abs(np.log(ratio.tir_hi / ratio.tir))))
    return text + (f". Sampling noise from the spread of the {docs} documents' own TIRs: a typical 95% interval is "
                   f"±{100 * (math.exp(width) - 1):.1f}%; a dot marks a cell whose interval holds 1 "
                   f"({int(ratio.within_noise.sum())} of {len(ratio)} ratio cells), so its colour could be noise.")


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
    for b in sorted(d.band.unique()):
        colour = band_colour(b)
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
