"""Plotly builders for the Learn page: arrays and tidy tables from qroar.teach -> figures (no Streamlit)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.charts import FONT, TRAINED_COLOUR, length_label, variant_colour

POINT, GRID_PT, ERR = "#1f5fae", "#d9622b", "#c62828"
NONE_C, PI_C, TRAINED_C = "#d9622b", "#2a9d5c", TRAINED_COLOUR
SHORT_C, LONG_C = "#1f5fae", "#d9622b"


def _style(fig: go.Figure, height: int, legend_y: float = 1.1) -> go.Figure:
    fig.update_layout(
        template="plotly_white", height=height, font=dict(family=FONT, size=13),
        margin=dict(l=60, r=20, t=80, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=legend_y, xanchor="left", x=0),
    )
    return fig


def _log_axis(fig: go.Figure, row: int, col: int, title: str) -> None:
    fig.update_yaxes(type="log", dtick=1, exponentformat="power", title_text=title, row=row, col=col)


def _segments(xs, ys) -> tuple[list, list]:
    """Many line segments as one trace: pairs of points separated by None."""
    X, Y = [], []
    for (x0, x1), (y0, y1) in zip(xs, ys):
        X += [x0, x1, None]
        Y += [y0, y1, None]
    return X, Y


# ----------------------------------------------------------------------------- 1. anisotropy


def _pair_traces(fig: go.Figure, orbit: pd.DataFrame, point, quantized, levels, lim: float, trail, col: int) -> None:
    """Grid, orbit, recent positions, the pair, its grid point and the error vector in one panel."""
    first = col == 1
    gx, gy = _segments([(v, v) for v in levels] + [(-lim, lim)] * len(levels),
                       [(-lim, lim)] * len(levels) + [(v, v) for v in levels])
    fig.add_trace(go.Scatter(x=gx, y=gy, mode="lines", line=dict(color="#b8c0cc", width=1), hoverinfo="skip",
                             name="quantizer grid", showlegend=first, legendgroup="qgrid"), row=1, col=col)
    fig.add_trace(go.Scatter(x=orbit["x"], y=orbit["y"], mode="lines", line=dict(color="#9aa5b1", dash="dot", width=1.5),
                             name="orbit over one turn", hoverinfo="skip", showlegend=first, legendgroup="orbit"), row=1, col=col)
    if trail is not None and len(trail):
        t = np.asarray(trail)
        fig.add_trace(go.Scatter(x=t[:, 0], y=t[:, 1], mode="markers", marker=dict(color=POINT, size=6, opacity=0.3),
                                 name="previous positions", hoverinfo="skip", showlegend=first, legendgroup="trail"),
                      row=1, col=col)
    fig.add_trace(go.Scatter(x=[0, point[0]], y=[0, point[1]], mode="lines+markers", line=dict(color=POINT, width=3),
                             marker=dict(size=[0, 11], color=POINT), name="rotated pair", showlegend=first,
                             legendgroup="pair", hovertemplate="(%{x:.3f}, %{y:.3f})<extra>pair</extra>"), row=1, col=col)
    fig.add_trace(go.Scatter(x=[quantized[0]], y=[quantized[1]], mode="markers", name="nearest grid point",
                             marker=dict(symbol="square", size=11, color=GRID_PT, line=dict(color="white", width=1)),
                             showlegend=first, legendgroup="grid",
                             hovertemplate="(%{x:.3f}, %{y:.3f})<extra>grid point</extra>"), row=1, col=col)
    fig.add_trace(go.Scatter(x=[point[0], quantized[0]], y=[point[1], quantized[1]], mode="lines", showlegend=first,
                             line=dict(color=ERR, width=3), name="error vector", legendgroup="err", hoverinfo="skip"),
                  row=1, col=col)


def anisotropy_figure(orbit: pd.DataFrame, point, quantized, levels, angle: float, trail=None,
                      height: int = 460) -> go.Figure:
    """The pair on the axis-aligned grid (equal aspect), a close-up of its grid cell with the error
    vector, and the rounding error vs rotation angle over one turn with the current angle marked.

    orbit: qroar.teach.error_vs_angle table; point / quantized: (x, y); levels: grid values per axis;
    angle: current rotation (radians, unwrapped); trail: (n, 2) earlier positions, optional.
    """
    levels = [float(v) for v in levels]
    lim = 1.12 * float(np.hypot(orbit["x"], orbit["y"]).max())  # the orbit's radius, with a margin
    fig = make_subplots(rows=1, cols=3, column_widths=[0.3, 0.3, 0.4], horizontal_spacing=0.09,
                        subplot_titles=("The pair (q_j, q_j+d/2) on the grid", "Close-up: rounding to the grid",
                                        "Rounding error over one turn"))
    for col in (1, 2):
        _pair_traces(fig, orbit, point, quantized, levels, lim, trail, col)
    half = 1.6 * (levels[1] - levels[0])  # about three grid cells around the pair
    for col, (xr, yr) in ((1, ([-lim, lim], [-lim, lim])),
                          (2, ([point[0] - half, point[0] + half], [point[1] - half, point[1] + half]))):
        # no plot gridlines here: the only grid drawn is the quantizer's
        fig.update_xaxes(range=xr, title_text="q_j", showgrid=False, zeroline=False, constrain="domain", row=1, col=col)
        fig.update_yaxes(range=yr, title_text="q_j+d/2" if col == 1 else None, scaleanchor=f"x{'' if col == 1 else col}",
                         scaleratio=1, showgrid=False, zeroline=False, constrain="domain", row=1, col=col)

    deg = np.degrees(orbit["angle"].to_numpy())
    fig.add_trace(go.Scatter(x=deg, y=orbit["error"], mode="lines", line=dict(color=ERR, width=1.5), showlegend=False,
                             name="error", hovertemplate="%{x:.1f}°: %{y:.4f}<extra></extra>"), row=1, col=3)
    mean = float(orbit["error"].mean())
    fig.add_trace(go.Scatter(x=[0, 360], y=[mean, mean], mode="lines", line=dict(color="#555", dash="dash", width=1.5),
                             name="mean error over the turn", hoverinfo="skip"), row=1, col=3)
    fig.add_trace(go.Scatter(x=[math.degrees(angle) % 360], y=[math.dist(point, quantized)], mode="markers",
                             marker=dict(color=POINT, size=11, line=dict(color="white", width=1)), showlegend=False,
                             hovertemplate="now %{x:.0f}°: %{y:.4f}<extra></extra>"), row=1, col=3)
    fig.update_xaxes(range=[0, 360], tickvals=list(range(0, 361, 90)), ticksuffix="°",
                     title_text="rotation angle p·θ_j mod 360°", row=1, col=3)
    fig.update_yaxes(rangemode="tozero", title_text="|error|", row=1, col=3)
    return _style(fig, height, legend_y=1.12)


# ----------------------------------------------------------------------------- 2. phases


def _band_lines(fig: go.Figure, table: pd.DataFrame, rows: int) -> None:
    """Dotted verticals between bands in every panel, band numbers along the top."""
    starts = table.groupby("band")["j"].min()
    ends = table.groupby("band")["j"].max()
    for b, j in starts.items():
        for r in range(1, rows + 1):
            if j > 0:
                fig.add_vline(x=j - 0.5, line_dash="dot", line_color="#c8ccd2", line_width=1, row=r, col=1)
        fig.add_annotation(x=(j + ends[b]) / 2, y=1.0, xref="x", yref="y domain", text=f"band {b}", showarrow=False,
                           yanchor="bottom", font=dict(size=10, color="#6b7280"))


def phase_figure(table: pd.DataFrame, trained_context: int, distance: int, pi_label: str,
                 height: int = 760) -> go.Figure:
    """Per pair j (x): turns over the trained context and over distance D without / with PI (log),
    the per-pair scale s_j, and the phase step between adjacent positions without / with PI (log)."""
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.42, 0.22, 0.36],
                        subplot_titles=(f"Full turns of each pair over a distance (D = {length_label(distance)} tokens)",
                                        "Interpolation scale s_j = ω_j / inv_freq_j",
                                        "Phase step between neighbouring positions (radians, wrapped)"))
    j = table["j"]
    L = length_label(trained_context)
    for col, name, colour, width, dash in (("turns_trained", f"trained context L = {L}, no PI", TRAINED_C, 2, "dot"),
                                           ("turns_none", f"D = {length_label(distance)}, no PI", NONE_C, 4, "solid"),
                                           ("turns_pi", f"D = {length_label(distance)}, {pi_label}", PI_C, 2, "solid")):
        fig.add_trace(go.Scatter(x=j, y=table[col], name=name, mode="lines", line=dict(color=colour, width=width, dash=dash),
                                 legendgroup=col, hovertemplate=f"pair %{{x}}: %{{y:.3g}} turns<extra>{name}</extra>"),
                      row=1, col=1)
    fig.add_hline(y=1.0, line_color="#888", line_width=1, row=1, col=1)
    # on a log axis an annotation's y is log10 of the value (shapes take the value itself)
    fig.add_annotation(x=0, xref="x domain", y=0.0, yref="y", text="one full turn", showarrow=False, xanchor="left",
                       yanchor="top", font=dict(size=11, color="#666"))
    fig.add_trace(go.Scatter(x=j, y=table["s"], mode="lines+markers", marker=dict(size=4), line=dict(color=PI_C, width=2),
                             showlegend=False, name="s_j", hovertemplate="pair %{x}: s = %{y:.3g}<extra></extra>"), row=2, col=1)
    for col, colour, width, name in (("step_none", NONE_C, 4, "no PI"), ("step_pi", PI_C, 2, pi_label)):
        fig.add_trace(go.Scatter(x=j, y=table[col], mode="lines", line=dict(color=colour, width=width), showlegend=False,
                                 name=name, hovertemplate=f"pair %{{x}}: %{{y:.3g}} rad<extra>{name}</extra>"), row=3, col=1)
    _log_axis(fig, 1, 1, "turns (log)")
    fig.update_yaxes(title_text="s_j", rangemode="tozero", row=2, col=1)
    _log_axis(fig, 3, 1, "radians (log)")
    fig.update_xaxes(title_text="pair j (high frequency → low frequency)", row=3, col=1)
    _band_lines(fig, table, 3)
    fig.layout.annotations[0].update(yshift=14)  # the first subplot title sits above the band labels
    return _style(fig, height, legend_y=1.07)


# ----------------------------------------------------------------------------- 3. tails


def tail_figure(y_short, y_long, report: dict, eps: float, bins: int = 60, height: int = 440) -> go.Figure:
    """Left: distribution of |W h| for short- vs long-position tokens (log density), their (1-eps) quantiles.
    Right: the step of a grid sized to each quantile and the short tokens' RMS rounding error under it."""
    ys, yl = np.asarray(y_short, dtype=float), np.asarray(y_long, dtype=float)
    edges = np.linspace(0, max(ys.max(), yl.max()), bins + 1)
    mid = (edges[:-1] + edges[1:]) / 2
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.12,
                        subplot_titles=("Distribution of |W h| (log density)", "A grid sized to the short or the long tail"))
    for y, name, colour in ((ys, "short positions (inside trained context)", SHORT_C),
                            (yl, "long positions (beyond it)", LONG_C)):
        dens, _ = np.histogram(y, bins=edges, density=True)
        fig.add_trace(go.Bar(x=mid, y=np.where(dens > 0, dens, np.nan), name=name, marker_color=colour, opacity=0.55,
                             width=edges[1] - edges[0], hovertemplate="|Wh| ≈ %{x:.2f}: %{y:.3g}<extra></extra>"),
                      row=1, col=1)
    q = f"Q{1 - eps:g}"
    for key, colour, pos in (("q_short", SHORT_C, "top right"), ("q_long", LONG_C, "top left")):
        fig.add_vline(x=report[key], line_dash="dash", line_color=colour, line_width=2, row=1, col=1)
    fig.add_annotation(x=report["q_short"], y=1.0, xref="x", yref="y domain", text=f"{q} short", showarrow=False,
                       xanchor="right", yanchor="top", xshift=-4, font=dict(size=11, color=SHORT_C))
    fig.add_annotation(x=report["q_long"], y=0.9, xref="x", yref="y domain", text=f"{q} long", showarrow=False,
                       xanchor="left", yanchor="top", xshift=4, font=dict(size=11, color=LONG_C))
    fig.update_layout(barmode="overlay")
    _log_axis(fig, 1, 1, "density (log)")
    fig.update_xaxes(title_text="|W h|", row=1, col=1)
    outer = ["grid step"] * 2 + ["RMS error, short tokens"] * 2
    inner = ["short", "long"] * 2  # which tail the grid is sized to
    vals = [report["step_short"], report["step_long"], report["rms_short"], report["rms_long"]]
    fig.add_trace(go.Bar(x=[outer, inner], y=vals, marker_color=[SHORT_C, LONG_C] * 2, showlegend=False,
                         text=[f"{v:.3g}" for v in vals], textposition="outside", cliponaxis=False,
                         hovertemplate="%{x}: %{y:.4g}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(title_text="value", rangemode="tozero", row=1, col=2)
    return _style(fig, height, legend_y=1.12)


# ----------------------------------------------------------------------------- 4. per-band logits


def logit_figure(table: pd.DataFrame, band: int, mode: str, height: int = 420) -> go.Figure:
    """Per band: RMS logit contribution (full precision) and RMS quantization error of it, original vs rescaled.

    `table`: qroar.teach.LogitDemo.table() (band, setting, rms_fp, rms_quant, rms_error)."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("Band's logit contribution (full precision, RMS over keys)",
                                        "Its quantization error (RMS over keys)"))
    styles = {"original": ("original weights", variant_colour("fp")),
              "rescaled": (f"band {band} rescaled ({mode})", variant_colour("qroar"))}
    for setting, (name, colour) in styles.items():
        d = table[table["setting"] == setting].sort_values("band")
        x = [f"band {b}" for b in d["band"]]
        fig.add_trace(go.Bar(x=x, y=d["rms_fp"], name=name, marker_color=colour, legendgroup=setting,
                             hovertemplate="%{x}: %{y:.4g}<extra>" + name + "</extra>"), row=1, col=1)
        fig.add_trace(go.Bar(x=x, y=d["rms_error"], name=name, marker_color=colour, legendgroup=setting, showlegend=False,
                             hovertemplate="%{x}: %{y:.4g}<extra>" + name + "</extra>"), row=1, col=2)
    for c in (1, 2):
        fig.add_vrect(x0=band - 0.5, x1=band + 0.5, fillcolor="#fff3cd", opacity=0.5, line_width=0, layer="below",
                      row=1, col=c)
    fig.update_yaxes(rangemode="tozero", title_text="RMS logit contribution", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", title_text="RMS error", row=1, col=2)
    fig.update_layout(barmode="group")
    return _style(fig, height, legend_y=1.12)
