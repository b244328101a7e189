"""Chart builders for the Fidelity & retrieval page: pure functions from qroar.fidelity / qroar.retrieval tables
to Plotly figures and display tables.

Fidelity: KL(P_FP || P_variant) and the share of positions whose top token is FP's, per log-spaced position
bucket (x = the bucket's last position), against FP under the same PI. Retrieval: one heatmap of a score per
variant (depth x prompt length), and PTQ + scales minus PTQ on the same prompts.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.charts import _length_axis, _style, _trained_line
from app.qroar_charts import STYLE, label

SCORES = {  # retrieval summary column -> (title, colour scale range)
    "token_acc": ("key token accuracy (teacher-forced)", (0.0, 1.0)),
    "exact": ("whole key right (teacher-forced)", (0.0, 1.0)),
    "key_logprob": ("mean key log-probability", None),
    "gen_exact": ("greedy exact match", (0.0, 1.0)),
}


def _colour(v: str) -> str | None:
    return STYLE.get(v, (v, None))[1]


def fidelity_figure(buckets: pd.DataFrame, trained_context: int | None = None, reference: str = "fp",
                    height: int = 560) -> go.Figure:
    """Mean KL to the reference (top, log y) and same top token % (bottom) per position bucket, one line per variant."""
    b = buckets[buckets["reference"] == reference]
    if b.empty:
        raise ValueError(f"no fidelity rows against {reference} to plot")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.55, 0.45],
                        subplot_titles=("Mean KL(P_FP || P_variant) per token", "Same top token as FP"))
    for v, d in b.groupby("variant", sort=False):
        d = d.sort_values("pos_hi")
        text = [f"positions {lo + 1}-{hi}" for lo, hi in zip(d["pos_lo"], d["pos_hi"])]
        common = dict(x=d["pos_hi"], mode="lines+markers", line=dict(color=_colour(v), width=2.5), marker=dict(size=8),
                      customdata=text)
        fig.add_trace(go.Scatter(y=d["mean_kld"], name=label(v), error_y=dict(array=d["mean_kld_unc"], thickness=1),
                                 hovertemplate=f"{label(v)}: %{{y:.5f}} (%{{customdata}})<extra></extra>", **common),
                      row=1, col=1)
        fig.add_trace(go.Scatter(y=100 * d["same_top"], name=label(v), showlegend=False,
                                 hovertemplate=f"{label(v)}: %{{y:.2f}}%<extra></extra>", **common), row=2, col=1)
    fig.update_yaxes(title_text="KL (nats)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="same top (%)", ticksuffix="%", row=2, col=1)
    positions = sorted({int(n) for n in b["pos_hi"]})
    for r in (1, 2):
        _length_axis(fig, positions, r, "position (last of each bucket)" if r == 2 else None, trained_context)
    _trained_line(fig, trained_context, 2)
    return _style(fig, height)


def overall_table(overall: pd.DataFrame, reference: str = "fp") -> pd.DataFrame:
    """Per (variant, length): llama.cpp's aggregates over positions 1..length, in display units."""
    o = overall[overall["reference"] == reference]
    return pd.DataFrame({
        "variant": [label(v) for v in o["variant"]], "length": o["length"].astype(int),
        "mean KLD": o["mean_kld"], "± KLD": o["mean_kld_unc"], "median KLD": o["median_kld"],
        "p99 KLD": o["p99_kld"], "max KLD": o["max_kld"], "same top %": 100 * o["same_top"],
        "RMS dp %": 100 * o["rms_dp"], "ln(PPL/PPL_FP)": o["delta_log_ppl"],
    }).reset_index(drop=True)


def _grid(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """depth (rows) x length (columns) of `col`."""
    return df.pivot(index="depth", columns="length", values=col).sort_index().sort_index(axis=1)


def passkey_figure(summary: pd.DataFrame, change: pd.DataFrame | None = None, score: str = "token_acc",
                   height: int = 380) -> go.Figure:
    """One heatmap per variant (rows: key depth, columns: prompt length) of `score`, then `change`'s
    (retrieval.paired_change: PTQ + scales minus PTQ on the same prompts) when given."""
    if summary.empty:
        raise ValueError("no retrieval rows to plot")
    title, zrange = SCORES[score]
    variants = list(dict.fromkeys(summary["variant"]))
    panels = [label(v) for v in variants] + (["PTQ + scales minus PTQ"] if change is not None else [])
    # long titles over narrow panels would run into each other: break them after their first words
    titles = [t.replace(" (", "<br>(").replace(" minus ", "<br>minus ") if len(panels) > 3 else t for t in panels]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles, horizontal_spacing=0.06)
    if zrange is None:
        vals = summary[score].astype(float)
        zrange = (float(vals.min()), float(vals.max()))
    for i, v in enumerate(variants, start=1):
        g = _grid(summary[summary["variant"] == v], score)
        fig.add_trace(go.Heatmap(z=g.values, x=[str(c) for c in g.columns], y=[f"{d:g}" for d in g.index],
                                 zmin=zrange[0], zmax=zrange[1], colorscale="Viridis", showscale=i == 1,
                                 colorbar=dict(title=dict(text=score), x=-0.12 if len(panels) > 1 else 1.02),
                                 texttemplate="%{z:.2f}",
                                 hovertemplate=f"{label(v)}<br>length %{{x}}, depth %{{y}}: %{{z:.3f}}<extra></extra>"),
                      row=1, col=i)
    if change is not None:
        g = _grid(change, "change")
        m = max(float(g.abs().max().max()), 1e-9) if g.size else 1.0
        m = m if math.isfinite(m) else 1.0
        fig.add_trace(go.Heatmap(z=g.values, x=[str(c) for c in g.columns], y=[f"{d:g}" for d in g.index],
                                 zmin=-m, zmax=m, colorscale="RdBu", showscale=True, colorbar=dict(title=dict(text="change")),
                                 texttemplate="%{z:+.2f}",
                                 hovertemplate="length %{x}, depth %{y}: %{z:+.3f}<extra></extra>"),
                      row=1, col=len(panels))
    for c in range(1, len(panels) + 1):
        fig.update_xaxes(type="category", title_text="prompt length (tokens)", row=1, col=c)
        fig.update_yaxes(type="category", title_text="key depth" if c == 1 else None, autorange="reversed", row=1, col=c)
    fig = _style(fig, height)
    fig.update_layout(hovermode="closest", title=dict(text=title, x=0, y=0.98, font=dict(size=14)))
    return fig


def passkey_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, length): means over depths and trials."""
    s = summary.groupby(["variant", "length"], sort=False).agg(
        token_acc=("token_acc", "mean"), exact=("exact", "mean"), key_logprob=("key_logprob", "mean"),
        gen_exact=("gen_exact", "mean")).reset_index()
    s["variant"] = [label(v) for v in s["variant"]]
    return s.rename(columns={"token_acc": "key token acc", "exact": "whole key", "key_logprob": "key log-prob",
                             "gen_exact": "greedy exact"})
