"""Chart builders: pure functions from tidy DataFrames to Plotly figures (no Streamlit, testable alone).

Colours are fixed per variant so every page shows full precision, quantized and repaired runs alike.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

VARIANT_STYLE = {  # name -> (label, colour)
    "fp": ("full precision", "#1f5fae"),
    "quant": ("quantized", "#d9622b"),
    "qroar": ("quantized + Q-ROAR", "#2a9d5c"),
}
OTHER_COLOURS = ("#7b4fa0", "#8c6d31", "#c2185b", "#00838f")
TRAINED_COLOUR = "#888888"
FONT = "Inter, Segoe UI, Helvetica, Arial, sans-serif"


def variant_label(v: str) -> str:
    return VARIANT_STYLE.get(v, (v, None))[0]


def variant_colour(v: str, i: int = 0) -> str:
    return VARIANT_STYLE[v][1] if v in VARIANT_STYLE else OTHER_COLOURS[i % len(OTHER_COLOURS)]


def length_label(n: int) -> str:
    """256 -> '256', 4096 -> '4K', 1536 -> '1.5K', 1048576 -> '1M'."""
    n = int(n)
    if n >= 1 << 20 and n % (1 << 18) == 0:
        return f"{n / (1 << 20):g}M"
    if n >= 1024 and n % 256 == 0:
        return f"{n / 1024:g}K"
    return str(n)


def penalty_table(summary: pd.DataFrame, trained_context: int | None = None) -> pd.DataFrame:
    """Wide table, one row per length: perplexity of each variant and each variant's penalty over fp (%)."""
    wide = summary.pivot(index="length", columns="variant", values="ppl").sort_index()
    order = [v for v in ("fp", "quant", "qroar") if v in wide] + [v for v in wide if v not in VARIANT_STYLE]
    out = pd.DataFrame({"length": wide.index.astype(int)})
    if trained_context:
        out["x trained"] = out["length"] / trained_context
    for v in order:
        out[f"ppl {v}"] = wide[v].to_numpy()
    if "fp" in wide:
        for v in order:
            if v != "fp":
                out[f"penalty {v} %"] = (100 * (wide[v] / wide["fp"] - 1)).to_numpy()
    return out


def _style(fig: go.Figure, height: int) -> go.Figure:
    fig.update_layout(
        template="plotly_white", height=height, font=dict(family=FONT, size=13),
        margin=dict(l=60, r=20, t=50, b=50), hovermode="x unified",
        legend=dict(orientation="h", yanchor="bottom", y=1.04, xanchor="left", x=0),
    )
    return fig


def _length_axis(fig: go.Figure, lengths, row: int, title: str | None, extra: int | None = None) -> None:
    """Log-scaled lengths, ticks at the measured ones, padded so end points and the trained line stay clear."""
    lo, hi = math.log10(min(lengths + [extra or min(lengths)])), math.log10(max(lengths + [extra or max(lengths)]))
    pad = max(0.06 * (hi - lo), 0.05)
    fig.update_xaxes(type="log", tickvals=list(lengths), ticktext=[length_label(n) for n in lengths],
                     range=[lo - pad, hi + pad], title_text=title, showgrid=True, row=row, col=1)


def _trained_line(fig: go.Figure, trained_context: int | None, rows: int, log_x: bool = True) -> None:
    """A dashed vertical line at the trained context in every panel, labelled once at the top."""
    if not trained_context:
        return
    for r in range(1, rows + 1):
        fig.add_vline(x=trained_context, line_dash="dash", line_color=TRAINED_COLOUR, line_width=1, row=r, col=1)
    # annotations on a log axis take log10 of the position (shapes take the value itself)
    fig.add_annotation(x=math.log10(trained_context) if log_x else trained_context, xref="x", y=1.0, yref="y domain",
                       text=f"trained context {length_label(trained_context)}", showarrow=False,
                       xanchor="left", yanchor="top", xshift=4, font=dict(size=11, color=TRAINED_COLOUR))


def perplexity_figure(summary: pd.DataFrame, trained_context: int | None = None, log_y: bool = False,
                      height: int = 560) -> go.Figure:
    """Perplexity vs context length per variant (top) and each variant's penalty over full precision (bottom).

    `summary` has one row per (variant, length) with a `ppl` column (tokens optional, shown on hover).
    """
    if summary.empty:
        raise ValueError("no perplexity rows to plot")
    variants = list(dict.fromkeys(summary["variant"]))
    has_penalty = "fp" in variants and len(variants) > 1
    rows = 2 if has_penalty else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        row_heights=[0.64, 0.36] if has_penalty else [1.0],
                        subplot_titles=("Perplexity", "Quantization penalty over full precision")[:rows])
    lengths = sorted({int(n) for n in summary["length"]})
    for i, v in enumerate(variants):
        d = summary[summary["variant"] == v].sort_values("length")
        tokens = d["tokens"] if "tokens" in d else [None] * len(d)
        fig.add_trace(go.Scatter(
            x=d["length"], y=d["ppl"], name=variant_label(v), mode="lines+markers",
            line=dict(color=variant_colour(v, i), width=2.5), marker=dict(size=8),
            customdata=list(tokens),
            hovertemplate=f"{variant_label(v)}: %{{y:.3f}}" + (" (%{customdata:,} tokens)" if "tokens" in d else "")
            + "<extra></extra>",
        ), row=1, col=1)
    if has_penalty:
        table = penalty_table(summary)
        for i, v in enumerate(variants):
            if v == "fp":
                continue
            fig.add_trace(go.Scatter(
                x=table["length"], y=table[f"penalty {v} %"], name=f"{variant_label(v)} penalty",
                mode="lines+markers", line=dict(color=variant_colour(v, i), width=2, dash="dot"),
                marker=dict(size=7, symbol="diamond"), showlegend=False,
                hovertemplate=f"{variant_label(v)} penalty: %{{y:+.2f}}%<extra></extra>",
            ), row=2, col=1)
        fig.add_hline(y=0, line_color="#bbbbbb", line_width=1, row=2, col=1)
        fig.update_yaxes(title_text="penalty (%)", ticksuffix="%", row=2, col=1)
    fig.update_yaxes(title_text="perplexity" + (" (log)" if log_y else ""), type="log" if log_y else "linear", row=1, col=1)
    for r in range(1, rows + 1):
        _length_axis(fig, lengths, r, "context length (tokens)" if r == rows else None, trained_context)
    _trained_line(fig, trained_context, rows)
    return _style(fig, height)
