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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import pandas as pd
import plotly.graph_objects as go

from qroar.errors import ConfigError
from qroar.rescale import describe_scales

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
KINDS = ("perplexity", "diagnostics", "tune", "search", "fidelity", "retrieval")  # job kinds a report draws, in this order


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ReportSettings:
    """What the session ran with, as plain JSON values: the model's load settings, the Recipe
    (qroar.recipe.Recipe.to_dict) whose scales are the chosen ones, the corpus and the evaluation."""

    model: dict  # app.engine.ModelKey.to_dict()
    recipe: dict  # qroar.recipe.Recipe.to_dict()
    corpus: str
    eval: dict  # qroar.perplexity.EvalConfig.to_dict(): lengths, stride, max_windows_per_doc, ...
    model_info: dict | None = None  # ModelInfo fields of the loaded model (for the header)
    scales_from: str | None = None  # where the chosen scales came from ("Search result ...", "Tune ...")

    @property
    def r(self):
        from qroar.recipe import Recipe

        return Recipe.from_dict(self.recipe)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReportSettings":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def settings_table(s: ReportSettings) -> pd.DataFrame:
    """The settings as (setting, value) rows, in the order of the Setup page."""
    r, e = s.r, s.eval
    pi, q = r.pi, r.quant
    extra = ", ".join(f"{k}={v}" for k, v in pi.params)
    rows = [("model", s.model.get("name")), ("device / dtype", f"{s.model.get('device')} / {s.model.get('dtype')}")]
    if s.model_info:
        i = s.model_info
        rows.append(("model shape", f"{i.get('n_layers')} layers, {i.get('n_heads')}/{i.get('n_kv_heads')} heads, "
                                    f"head_dim {i.get('head_dim')}, trained context {i.get('trained_context')}"))
    rows.append(("position interpolation", "none" if pi.rope_type == "default" else
                 f"{pi.rope_type} x{pi.factor:g}" + (f" (original {pi.original_max_position_embeddings})"
                                                     if pi.original_max_position_embeddings else "")
                 + (f"; {extra}" if extra else "")))
    rows.append(("quantizer", "none (full precision)" if not r.quantized else
                 f"{q.method} w{q.bits} group {q.group_size or 'per channel'} "
                 f"{'sym' if q.symmetric else 'asym'}, scope {q.scope}"))
    rows.append(("corpus", s.corpus))
    rows.append(("context lengths", ", ".join(str(n) for n in e.get("lengths", ()))))
    rows.append(("windows per document", e.get("max_windows_per_doc") or "all"))
    rows.append(("stride", e.get("stride") or "non-overlapping"))
    rows.append(("bands", f"{r.bands.n_bands} ({r.bands.align}-spaced)"))
    rows.append(("rescaling", f"{r.scale.mode} mode, {r.scale.order} quantization"))
    rows.append(("scales", "all 1" if r.scales is None else describe_scales(r.scales)
                 + (f" ({s.scales_from})" if s.scales_from and r.scales is not None else "")))
    return pd.DataFrame(rows, columns=["setting", "value"]).astype({"value": str})


# ----------------------------------------------------------------------------- reproducing commands


def _model_args(m: dict) -> list[str]:
    args = ["--model", m["name"]]
    for flag, key in (("--device", "device"), ("--dtype", "dtype")):
        if m.get(key, "auto") != "auto":
            args += [flag, m[key]]
    args += ["--allow-pickle"] * bool(m.get("allow_pickle")) + ["--trust-remote-code"] * bool(m.get("trust_remote_code"))
    return args


def _recipe(d: dict, **changes):
    from dataclasses import replace

    from qroar.recipe import Recipe

    return replace(Recipe.from_dict(d), **changes)


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


def eval_command(s: ReportSettings, out: str = "perplexity", scales: bool = False) -> str:
    """`qroar eval` of the session's recipe (with its scales when asked: what Tune measured)."""
    e = s.eval
    r = _recipe(s.recipe, windows=None) if scales else _recipe(s.recipe, scales=None, edges=None, windows=None)
    args = ["eval", *_model_args(s.model), *r.to_args(), "--corpus", s.corpus,
            "--lengths", ",".join(str(n) for n in e["lengths"]), "--max-windows", str(e.get("max_windows_per_doc") or 0)]
    if e.get("stride"):
        args += ["--stride", str(e["stride"])]
    return _line(args + ["--out", out])


def diagnose_command(s: ReportSettings, diag: dict, out: str = "diagnostics") -> tuple[str, list[str]]:
    """`qroar diagnose` for a DiagResult's settings; also the settings the command line cannot set."""
    from qroar.quant import QuantConfig
    from qroar.rope import PIConfig

    cfg = diag.get("diag", {})
    band_cfg = cfg.get("bands") or {}  # None in the config: the bands the workbench had, recorded as edges
    n_bands = band_cfg.get("n_bands") or len(diag.get("bands", {}).get("edges", [0] * 9)) - 1
    q = diag.get("quant")
    r = _recipe(s.recipe, pi=PIConfig.from_dict(diag["pi"]) if diag.get("pi") else _recipe(s.recipe).pi,
                quant=QuantConfig.from_dict(q) if q else QuantConfig(method="none"), scales=None, edges=None, windows=None)
    r = r.set("bands.n_bands", n_bands).set("bands.align", band_cfg.get("align", "log"))
    args = ["diagnose", *_model_args(s.model), *r.to_args(),
            "--corpus", diag.get("corpus", s.corpus), "--capture-length", str(diag["capture_length"]),
            "--n-docs", str(cfg.get("n_docs", 4)), "--eps", f"{cfg.get('eps', 1e-3):g}"]
    if cfg.get("axis") is False:
        args.append("--no-axis")
    if cfg.get("noise_layers"):
        args += ["--noise-layers", ",".join(map(str, cfg["noise_layers"]))]
    if cfg.get("ip_lengths"):
        args += ["--ip-lengths", ",".join(map(str, cfg["ip_lengths"]))]
    missing = [f"{k}={cfg[k]}" for k, default in (("noise_pairs", 256), ("skip_first", 0), ("seed", 0))
               if k in cfg and cfg[k] != default]
    return _line(args + ["--out", out]), missing


def search_command(s: ReportSettings, res, out: str = "scales.json") -> str:
    """`qroar search` that reruns a SearchResult: its recipe (windows as searched) and its search settings."""
    from qroar.search import SearchConfig, search_args

    w = res.windows.sort_values("band")
    r = _recipe(res.recipe, scales=None, windows=tuple(zip(w["g_min"].astype(float), w["g_max"].astype(float))))
    args = ["search", *_model_args(s.model), *r.to_args(), *search_args(SearchConfig.from_dict(res.search_cfg))]
    return _line(args + ["--out", out, "--report", "search"])


def _run_recipe(recipe: dict):
    return _recipe(recipe, windows=None)  # windows only bound a search; the scales (if any) are what ran


def fidelity_command(s: ReportSettings, res, out: str = "fidelity") -> str:
    """`qroar fidelity` that reruns a FidelityResult: its recipe (scales included) and its settings."""
    st, c = res.settings, res.settings["config"]
    args = ["fidelity", *_model_args(s.model), *_run_recipe(st["recipe"]).to_args(), "--corpus", st["corpus"],
            "--lengths", ",".join(map(str, c["lengths"])), "--max-windows", str(c.get("max_windows_per_doc") or 0),
            "--max-docs", str(c.get("max_docs") or 0)]
    if c.get("nopi"):
        args.append("--nopi")
    if c.get("per_octave", 1) != 1:
        args += ["--per-octave", str(c["per_octave"])]
    if c.get("precision", "float32") != "float32":
        args += ["--precision", c["precision"]]
    return _line(args + ["--out", out])


def retrieval_command(s: ReportSettings, res, out: str = "passkey") -> str:
    """`qroar retrieval` that reruns a RetrievalResult: its recipe (scales included) and its settings."""
    st, c = res.settings, res.settings["config"]
    args = ["retrieval", *_model_args(s.model), *_run_recipe(st["recipe"]).to_args(),
            "--lengths", ",".join(map(str, c["lengths"])), "--depths", ",".join(f"{d:g}" for d in c["depths"]),
            "--trials", str(c["trials"]), "--key", c["key"], "--digits", str(c["digits"]), "--haystack", c["haystack"],
            "--corpus", c["corpus"], "--seed", str(c["seed"])]
    if c.get("generate"):
        args.append("--generate")
    return _line(args + ["--out", out])


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
                   (cmd, "qroar-figures diagnostics --format html"))


def tune_section(res, s: ReportSettings) -> Section:
    from app import qroar_charts

    t = res.recipe
    scales = qroar_charts.scales_table(t.scales)
    text = f"Scales set by hand ({t.scale.mode} mode, {t.scale.order} quantization), {res.seconds:.1f} s."
    if res.note:
        text += f" Note: {res.note}"
    return Section("Tune", text, (("tune", qroar_charts.tune_figure(res.summary, res.trained_context)),),
                   (("Perplexity per length: FP, PTQ, PTQ + scales", qroar_charts.change_table(res.summary)),
                    ("Scales", scales)),
                   (eval_command(ReportSettings(s.model, res.recipe.to_dict(), s.corpus, s.eval), "tune", scales=True),))


def search_section(res, s: ReportSettings) -> Section:
    from app import qroar_charts

    layered = qroar_charts.is_per_layer(res.scales)
    figs = [("search_scales", qroar_charts.layer_scales_figure(res.scales) if layered
             else qroar_charts.scales_figure(res.scales, res.windows, res.folds))]
    dev_quant = res.dev[res.dev["variant"] == "quant"]
    if len(res.history) and len(dev_quant):
        short = float(dev_quant.loc[dev_quant["length"].idxmin(), "log_ppl"])
        trace = qroar_charts.trace_figure(res.history[res.history["fold"] == "all"], res.objective["dev"]["quant"],
                                          short, (res.search_cfg or {}).get("guard_tol", 0.005), res.scales)
        figs.append(("search_trace", trace))
    held = res.heldout.pivot(index="length", columns="variant", values="ppl").reset_index()
    if {"quant", "quant_scaled"} <= set(held.columns):
        held["scaled vs PTQ %"] = 100 * (held["quant_scaled"] / held["quant"] - 1)
    windows = res.windows if layered else res.windows.assign(scale=res.scales)
    text = (f"Held-out objective change {100 * res.heldout_gain():+.3f}% ({res.spent} {res.unit}, "
            f"{res.seconds:.1f} s).")
    if len(figs) > 1:
        text += f" Search trace: {qroar_charts.TRACE_CAPTION}"
    if res.note:
        text += f" Note: {res.note} The change is rounding noise, not a gain."
    tables = [("Held-out perplexity (documents the search never saw)", held), ("Windows and chosen scales", windows)]
    if layered:
        tables[1] = ("Windows", windows)
        tables.append(("Chosen scales per layer (layers x bands)", qroar_charts.scales_table(res.scales)))
    if res.folds is not None:
        tables.append(("k-fold stability of the chosen scales", res.folds))
    return Section("Search", text, tuple(figs), tuple(tables), (search_command(s, res),))


def fidelity_section(res, s: ReportSettings) -> Section:
    from app import fidelity_charts as fc

    st = res.settings
    text = (f"KL divergence to full precision under the same PI and same top token, by position: "
            f"{len(res.windows)} window(s) of {max(st['config']['lengths'])} tokens, trained context "
            f"{st['trained_context']}, {st.get('seconds', 0):.1f} s.")
    return Section("Fidelity", text, (("fidelity", fc.fidelity_figure(res.buckets, st["trained_context"])),),
                   (("KL to full precision and same top token per length (positions 1..length)", fc.overall_table(res.overall)),),
                   (fidelity_command(s, res),))


def retrieval_section(res, s: ReportSettings) -> Section:
    from app import fidelity_charts as fc
    from qroar.retrieval import paired_change

    st = res.settings
    variants = set(res.trials["variant"])
    change = paired_change(res.trials, col="token_acc") if {"quant", "quant_scaled"} <= variants else None
    text = (f"Passkey retrieval: {st['config']['trials']} prompt(s) per length and depth, key scored teacher-forced, "
            f"{st.get('seconds', 0):.1f} s.")
    return Section("Retrieval", text, (("passkey", fc.passkey_figure(res.summary, change)),),
                   (("Passkey scores per variant and length (means over depths and trials)", fc.passkey_table(res.summary)),),
                   (retrieval_command(s, res),))


SECTIONS: dict[str, Callable[[Any, ReportSettings], Section]] = {  # job kind -> section builder
    "perplexity": perplexity_section, "diagnostics": diagnostics_section, "tune": tune_section, "search": search_section,
    "fidelity": fidelity_section, "retrieval": retrieval_section,
}


def sections(results: dict[str, Any], s: ReportSettings) -> list[Section]:
    """The settings first, then one section per result present (in KINDS order), then the scales and commands."""
    out = [Section("Settings", "What the session ran with.", tables=(("", settings_table(s)),))]
    out += [SECTIONS[k](results[k], s) for k in KINDS if results.get(k) is not None]
    r = s.r
    if r.scales is not None:
        from app.qroar_charts import scales_table

        scales = scales_table(r.scales)
        out.append(Section("Chosen scales", (f"From {s.scales_from}; " if s.scales_from else "")
                           + f"{r.scale.mode} mode, {r.scale.order} quantization; "
                           "save them as a scales file from the Export page (`qroar apply` / `qroar export` read it).",
                           tables=(("", scales),)))
    cmds = [c for sec in out for c in sec.code] or [eval_command(s)]
    out.append(Section("Reproduce", "The command lines that recompute these results without the dashboard.", code=tuple(cmds)))
    return out


# ----------------------------------------------------------------------------- runs side by side


def run_report_settings(run, s: ReportSettings) -> ReportSettings:
    """The settings a run (app.runs.Run) ran with, as report settings: its Recipe, so its section's command comes
    from the run's own `recipe.to_args()`; the session's model, corpus and evaluation where the run does not say."""
    r = run.settings
    model = r.get("model") or s.model
    return ReportSettings(model=model, recipe=run.recipe.to_dict(), corpus=r.get("corpus") or s.corpus,
                          eval=r.get("eval") or s.eval, model_info=s.model_info if model == s.model else None)


def run_sections(runs: list, s: ReportSettings) -> list[Section]:
    """Chosen runs: one section with the settings that differ and the overlays, then one per run with its own
    settings and its kind's figures, tables and command."""
    from app.run_charts import OVERLAY_TITLES
    from app.runs import comparison, runs_table, settings_rows

    diff, figs = comparison(runs)
    listing = runs_table(runs).drop(columns=["id", "pinned"])
    out = [Section("Compared runs", f"{len(runs)} runs of this session side by side: "
                   + "; ".join(OVERLAY_TITLES.get(k, k) for k in figs) + ".", tuple(figs.items()),
                   (("The runs", listing), ("Settings that differ", diff)))]
    for run in runs:
        builder = SECTIONS.get(run.kind)
        own = builder(run.result, run_report_settings(run, s)) if builder else Section(run.name)
        when = time.strftime("%H:%M:%S", time.localtime(run.created))
        out.append(Section(f"Run {run.id}: {run.name}", f"{run.kind.capitalize()} run of {when}. {own.text}".strip(),
                           own.figures, (("Settings of this run", settings_rows(run.settings)), *own.tables), own.code))
    return out


def with_runs(parts: list[Section], runs: list, s: ReportSettings) -> list[Section]:
    """A report's sections (sections()) with the chosen runs before Reproduce, which then has their commands too."""
    body = parts[:-1] + run_sections(runs, s)
    cmds = tuple(dict.fromkeys(c for sec in body for c in sec.code))
    return body + [replace(parts[-1], code=cmds or parts[-1].code)]


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
