"""Session report: one self-contained HTML file with the settings, every figure and table of the session's
results, the chosen scales and the `qroar` command lines that reproduce them.

No Streamlit and no engine calls here: the Report page hands in plain settings and the results of the
session's finished jobs (app.state.result(kind).result); everything below is testable on its own.
Figures are interactive Plotly with plotly.js inlined once, so the file works offline.
"""

from __future__ import annotations

import html
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pandas as pd
import plotly.graph_objects as go

from qroar.errors import ConfigError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
KINDS = ("perplexity", "diagnostics", "tune", "search")  # job kinds a report draws, in this order


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ReportSettings:
    """What the session ran with, as plain JSON values (the engine's own to_dict() forms)."""

    model: dict  # app.engine.ModelKey.to_dict()
    pi: dict  # qroar.rope.PIConfig.to_dict()
    quant: dict | None  # qroar.quant.QuantConfig.to_dict(); None: full precision
    corpus: str
    eval: dict  # qroar.perplexity.EvalConfig.to_dict(): lengths, stride, max_windows_per_doc, ...
    bands: dict = field(default_factory=lambda: {"n_bands": 8, "align": "log"})
    scale: dict = field(default_factory=lambda: {"mode": "shared", "order": "before"})
    scales: tuple[float, ...] | None = None
    model_info: dict | None = None  # ModelInfo fields of the loaded model (for the header)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scales"] = None if self.scales is None else list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ReportSettings":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if kw.get("scales") is not None:
            kw["scales"] = tuple(float(g) for g in kw["scales"])
        return cls(**kw)


def settings_table(s: ReportSettings) -> pd.DataFrame:
    """The settings as (setting, value) rows, in the order of the Setup page."""
    pi, q, e = s.pi, s.quant, s.eval
    extra = ", ".join(f"{k}={v}" for k, v in (pi.get("params") or {}).items())
    rows = [("model", s.model.get("name")), ("device / dtype", f"{s.model.get('device')} / {s.model.get('dtype')}")]
    if s.model_info:
        i = s.model_info
        rows.append(("model shape", f"{i.get('n_layers')} layers, {i.get('n_heads')}/{i.get('n_kv_heads')} heads, "
                                    f"head_dim {i.get('head_dim')}, trained context {i.get('trained_context')}"))
    rows.append(("position interpolation", "none" if pi["rope_type"] == "default" else
                 f"{pi['rope_type']} x{pi['factor']:g}" + (f" (original {pi['original_max_position_embeddings']})"
                                                           if pi.get("original_max_position_embeddings") else "")
                 + (f"; {extra}" if extra else "")))
    rows.append(("quantizer", "none (full precision)" if q is None or q["method"] == "none" else
                 f"{q['method']} w{q['bits']} group {q['group_size'] or 'per channel'} "
                 f"{'sym' if q['symmetric'] else 'asym'}, scope {q['scope']}"))
    rows.append(("corpus", s.corpus))
    rows.append(("context lengths", ", ".join(str(n) for n in e.get("lengths", ()))))
    rows.append(("windows per document", e.get("max_windows_per_doc") or "all"))
    rows.append(("stride", e.get("stride") or "non-overlapping"))
    rows.append(("bands", f"{s.bands.get('n_bands')} ({s.bands.get('align')}-spaced)"))
    rows.append(("rescaling", f"{s.scale.get('mode')} mode, {s.scale.get('order')} quantization"))
    rows.append(("scales", "all 1" if s.scales is None else ", ".join(f"b{b}={g:.4g}" for b, g in enumerate(s.scales))))
    return pd.DataFrame(rows, columns=["setting", "value"]).astype({"value": str})


# ----------------------------------------------------------------------------- reproducing commands


def _model_args(m: dict) -> list[str]:
    args = ["--model", m["name"]]
    for flag, key in (("--device", "device"), ("--dtype", "dtype")):
        if m.get(key, "auto") != "auto":
            args += [flag, m[key]]
    args += ["--allow-pickle"] * bool(m.get("allow_pickle")) + ["--trust-remote-code"] * bool(m.get("trust_remote_code"))
    return args


def _pi_args(pi: dict) -> list[str]:
    if pi["rope_type"] == "default":
        return []
    args = ["--pi", pi["rope_type"], "--factor", f"{pi['factor']:g}"]
    if pi.get("original_max_position_embeddings"):
        args += ["--original", str(pi["original_max_position_embeddings"])]
    for k, v in (pi.get("params") or {}).items():
        args += ["--pi-param", f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"]
    return args


def _quant_args(q: dict | None) -> list[str]:
    if q is None or q["method"] == "none":
        return ["--quant", "none"]
    args = ["--quant", q["method"], "--bits", str(q["bits"]), "--group-size", str(q["group_size"]), "--scope", q["scope"]]
    args += ["--sym"] * bool(q["symmetric"])
    if q["method"] in ("gptq", "awq"):
        args += ["--calib-samples", str(q["n_samples"]), "--calib-len", str(q["seq_len"])]
    return args


def _line(args: list[str], width: int = 88) -> str:
    """`qroar ...` as shell text: each option with its value, lines continued with a backslash past `width`."""
    groups = [f"qroar {shlex.quote(args[0])}"]
    for a in args[1:]:
        if a.startswith("--") or len(groups) == 1:
            groups.append(shlex.quote(a))
        else:
            groups[-1] += " " + shlex.quote(a)
    lines = [groups[0]]
    for g in groups[1:]:
        if len(lines[-1]) + 1 + len(g) > width:
            lines.append("    " + g)
        else:
            lines[-1] += " " + g
    return " \\\n".join(lines)


def eval_command(s: ReportSettings, out: str = "perplexity") -> str:
    e = s.eval
    args = ["eval", *_model_args(s.model), *_pi_args(s.pi), *_quant_args(s.quant), "--corpus", s.corpus,
            "--lengths", ",".join(str(n) for n in e["lengths"])]
    if e.get("max_windows_per_doc"):
        args += ["--max-windows", str(e["max_windows_per_doc"])]
    if e.get("stride"):
        args += ["--stride", str(e["stride"])]
    return _line(args + ["--out", out])


def diagnose_command(s: ReportSettings, diag: dict, out: str = "diagnostics") -> tuple[str, list[str]]:
    """`qroar diagnose` for a DiagResult's settings; also the settings the command line cannot set."""
    cfg = diag.get("diag", {})
    band_cfg = cfg.get("bands") or {}  # None in the config: the bands the workbench had, recorded as edges
    n_bands = band_cfg.get("n_bands") or len(diag.get("bands", {}).get("edges", [0] * 9)) - 1
    args = ["diagnose", *_model_args(s.model), *_pi_args(diag.get("pi", s.pi)), *_quant_args(diag.get("quant", s.quant)),
            "--corpus", diag.get("corpus", s.corpus), "--bands", str(n_bands), "--band-align", band_cfg.get("align", "log"), "--capture-length", str(diag["capture_length"]),
            "--n-docs", str(cfg.get("n_docs", 4)), "--eps", f"{cfg.get('eps', 1e-3):g}"]
    if cfg.get("axis") is False:
        args.append("--no-axis")
    if cfg.get("noise_layers"):
        args += ["--noise-layers", ",".join(map(str, cfg["noise_layers"]))]
    if cfg.get("ip_lengths"):
        args += ["--ip-lengths", ",".join(map(str, cfg["ip_lengths"]))]
    missing = [f"{k}={cfg[k]}" for k, default in (("noise_pairs", 256), ("skip_first", 0), ("seed", 0))
               if k in cfg and cfg[k] != default]
    return _line(args + ["--out", out, "--figures", "html"]), missing


def search_command(s: ReportSettings, search: dict, out: str = "scales.json") -> str:
    """`qroar search` for a SearchResult's settings (its search config and the windows it searched in)."""
    c = search.get("search", {})
    args = ["search", *_model_args(s.model), *_pi_args(search.get("pi", s.pi)), *_quant_args(search.get("quant", s.quant)),
            "--bands", str(s.bands.get("n_bands")), "--band-align", s.bands.get("align", "log"),
            "--mode", c.get("mode", s.scale.get("mode")), "--order", c.get("order", s.scale.get("order")),
            "--dev-corpus", c.get("dev_corpus", "embedded:dev"), "--heldout-corpus", c.get("heldout_corpus", "embedded:heldout"),
            "--lengths", ",".join(map(str, c.get("lengths", s.eval["lengths"])))]
    if c.get("length_weights"):
        args += ["--length-weights", ",".join(f"{w:g}" for w in c["length_weights"])]
    if c.get("max_windows_per_doc"):
        args += ["--max-windows", str(c["max_windows_per_doc"])]
    args += ["--candidates", str(c.get("n_candidates", 7)), "--sweeps", str(c.get("sweeps", 1)),
             "--guard", f"{c.get('guard_tol', 0.005):g}", "--folds", str(c.get("k_folds", 0))]
    if search.get("windows"):
        args += ["--windows", ",".join(f"{lo:.6g}:{hi:.6g}" for lo, hi in search["windows"])]
    return _line(args + ["--out", out, "--report", "search"])


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    """One part of the report: a heading, a line of text, figures, tables and code, in that order."""

    title: str
    text: str = ""
    figures: tuple[tuple[str, go.Figure], ...] = ()  # (name, figure)
    tables: tuple[tuple[str, pd.DataFrame], ...] = ()  # (caption, table)
    code: tuple[str, ...] = ()


def perplexity_section(res, s: ReportSettings) -> Section:
    from app import charts

    return Section("Perplexity", f"Full precision vs quantized, {res.seconds:.1f} s.",
                   (("perplexity", charts.perplexity_figure(res.summary, res.trained_context)),),
                   (("Perplexity per length and the quantization penalty", charts.penalty_table(res.summary, res.trained_context)),),
                   (eval_command(s),))


def diagnostics_section(res, s: ReportSettings) -> Section:
    from app import diag_charts

    t, st = res.tables, res.settings
    ip = t["ip"].pivot(index="band", columns="length", values="ip_mean").reset_index()
    ip.columns = [str(c) if c == "band" else f"IP mean, D={c}" for c in ip.columns]
    tir = (t["tir"].groupby(["kind", "variant", "proj", "band"]).tir.median().unstack("band")
           .rename(columns=lambda b: f"b{b}").reset_index())
    noise = t["logit_noise_pooled"]
    noise = (noise.pivot_table(index=["mode", "band"], columns="bucket_lo", values="rel_err")
             .rename(columns=lambda c: f"d>={c}").reset_index())
    cmd, missing = diagnose_command(s, st)
    text = (f"{len(st.get('docs', []))} document(s) of {st.get('capture_length')} tokens, trained context "
            f"{st.get('trained_context')}, {st.get('seconds', 0):.1f} s.")
    if missing:
        text += f" Not settable from the command line (set in the dashboard): {', '.join(missing)}."
    return Section("Diagnostics", text, tuple(diag_charts.figures(t, st.get("trained_context")).items()),
                   (("Interpolation Pressure, band mean", ip), ("Tail Inflation Ratio, median over layers (W: projections, A: per axis)", tir),
                    ("Relative logit noise (RMS error / RMS logit), pooled over sampled layers, by distance bucket", noise)),
                   (cmd,))


def tune_section(res, s: ReportSettings) -> Section:
    from app import qroar_charts

    t = res.tuning
    scales = pd.DataFrame({"band": [f"b{b}" for b in range(len(t.scales))], "scale g_b": list(t.scales)})
    text = f"Scales set by hand ({t.scale.mode} mode, {t.scale.order} quantization), {res.seconds:.1f} s."
    if res.note:
        text += f" Note: {res.note}"
    return Section("Tune", text, (("tune", qroar_charts.tune_figure(res.summary, res.trained_context)),),
                   (("Perplexity per length: FP, PTQ, PTQ + scales", qroar_charts.change_table(res.summary)),
                    ("Scales", scales)))


def search_section(res, s: ReportSettings) -> Section:
    from app import qroar_charts

    figs = [("search_scales", qroar_charts.scales_figure(res.scales, res.windows, res.folds))]
    dev_quant = res.dev[res.dev["variant"] == "quant"]
    if len(res.history) and len(dev_quant):
        short = float(dev_quant.loc[dev_quant["length"].idxmin(), "log_ppl"])
        trace = qroar_charts.trace_figure(res.history[res.history["fold"] == "all"], res.objective["dev"]["quant"],
                                          short, res.settings.get("search", {}).get("guard_tol", 0.005), res.scales)
        figs.append(("search_trace", trace))
    held = res.heldout.pivot(index="length", columns="variant", values="ppl").reset_index()
    if {"quant", "scaled"} <= set(held.columns):
        held["scaled vs PTQ %"] = 100 * (held["scaled"] / held["quant"] - 1)
    windows = res.windows.assign(scale=res.scales)
    text = (f"Held-out objective change {100 * res.heldout_gain():+.3f}% ({res.spent} {res.unit}, "
            f"{res.seconds:.1f} s).")
    if len(figs) > 1:
        text += f" Search trace: {qroar_charts.TRACE_CAPTION}"
    if res.note:
        text += f" Note: {res.note} The change is rounding noise, not a gain."
    tables = [("Held-out perplexity (documents the search never saw)", held), ("Windows and chosen scales", windows)]
    if res.folds is not None:
        tables.append(("k-fold stability of the chosen scales", res.folds))
    return Section("Search", text, tuple(figs), tuple(tables), (search_command(s, res.settings),))


SECTIONS: dict[str, Callable[[Any, ReportSettings], Section]] = {  # job kind -> section builder
    "perplexity": perplexity_section, "diagnostics": diagnostics_section, "tune": tune_section, "search": search_section,
}


def sections(results: dict[str, Any], s: ReportSettings) -> list[Section]:
    """The settings first, then one section per result present (in KINDS order), then the scales and commands."""
    out = [Section("Settings", "What the session ran with.", tables=(("", settings_table(s)),))]
    out += [SECTIONS[k](results[k], s) for k in KINDS if results.get(k) is not None]
    if s.scales is not None:
        scales = pd.DataFrame({"band": [f"b{b}" for b in range(len(s.scales))], "scale g_b": list(s.scales)})
        out.append(Section("Chosen scales", f"{s.scale.get('mode')} mode, {s.scale.get('order')} quantization; "
                           "save them as a scales file from the Export page (`qroar apply` / `qroar export` read it).",
                           tables=(("", scales),)))
    cmds = [c for sec in out for c in sec.code] or [eval_command(s)]
    out.append(Section("Reproduce", "The command lines that recompute these results without the dashboard.", code=tuple(cmds)))
    return out


# ----------------------------------------------------------------------------- HTML


CSS = """
body { font-family: Inter, "Segoe UI", Helvetica, Arial, sans-serif; color: #1b2330; max-width: 1180px; margin: 2em auto; padding: 0 1.5em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #dde2ea; padding-bottom: 0.2em; }
p.meta { color: #5a6475; } nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #e3e7ee; padding: 0.3em 0.8em; text-align: right; }
th { background: #f3f5f9; } td:first-child, th:first-child, table.text td, table.text th { text-align: left; }
pre { background: #f3f5f9; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
.caption { color: #5a6475; font-size: 0.9em; margin-bottom: 0; }
"""


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower())


def _table_html(df: pd.DataFrame) -> str:
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) and math.isfinite(x) else str(x)  # noqa: E731
    text = not any(pd.api.types.is_numeric_dtype(df[c]) for c in df.columns)  # words read left-aligned
    return df.to_html(index=False, border=0, na_rep="", float_format=fmt, escape=True, classes="text" if text else None)


def _figure_html(fig: go.Figure, name: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                       config={"displaylogo": False, "responsive": True})


def build_html(parts: list[Section], title: str = "Q-ROAR session report", created: float | None = None) -> str:
    """The whole report as one HTML document: plotly.js inline once in <head>, then every section."""
    from plotly.offline import get_plotlyjs

    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created or time.time()))
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">Written {when} by the qroar dashboard.</p>',
            "<nav>" + "".join(f'<a href="#{_anchor(p.title)}">{html.escape(p.title)}</a>' for p in parts) + "</nav>"]
    for p in parts:
        body.append(f'<section id="{_anchor(p.title)}"><h2>{html.escape(p.title)}</h2>')
        if p.text:
            body.append(f"<p>{html.escape(p.text)}</p>")
        body += [_figure_html(fig, f"{_anchor(p.title)}-{name}") for name, fig in p.figures]
        for caption, df in p.tables:
            body.append((f'<p class="caption">{html.escape(caption)}</p>' if caption else "") + _table_html(df))
        body += [f"<pre><code>{html.escape(c)}</code></pre>" for c in p.code]
        body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>\n<body>\n'
            + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------- PNG


def find_browser() -> str | None:
    """The Chrome/Chromium kaleido will drive: $BROWSER_PATH, else the first one on PATH (nothing is downloaded)."""
    path = os.environ.get("BROWSER_PATH")
    if path:
        return path if os.path.exists(path) else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def figure_png(fig: go.Figure, width: int = 1100, height: int | None = None, scale: float = 1.0) -> bytes:
    """The figure as PNG through kaleido and the system's Chromium; ConfigError with what to do when there is none."""
    browser = find_browser()
    if browser is None:
        raise ConfigError("PNG export needs Chrome or Chromium (Debian: apt-get install chromium; or set BROWSER_PATH "
                          "to one). The HTML report has every figure, interactive, without it.")
    os.environ.setdefault("BROWSER_PATH", browser)  # kaleido (choreographer) reads it
    try:
        return fig.to_image(format="png", width=width, height=height or fig.layout.height or 500, scale=scale)
    except Exception as e:  # kaleido/Chromium failures come in many types; the user needs the message, not a trace
        raise ConfigError(f"PNG export failed ({type(e).__name__}: {e}). Download the HTML report instead, "
                          "or check that Chromium runs on this server.") from e
