"""Tune: per-band windows and scales by hand; perplexity of FP, PTQ and PTQ + scales re-runs at every move."""

import math
from dataclasses import replace

import streamlit as st

from app import qroar_charts as qc, state, widgets as w
from app.engine import loaded_entry, matching_tir, tune_job
from qroar import recipe as recipe_mod
from qroar.errors import QroarError
from qroar.rescale import describe_scales
from qroar.search import G_FLOOR, W_MAX, W_MIN

RULE = (f"Window rule (qroar.search.derive_windows): G_b = [exp(-w_b), exp(w_b)] with "
        f"w_b = clip(ln {math.exp(W_MAX):g} x (IP_min / IP_b)^(1/4), ln {math.exp(W_MIN):g}, ln {math.exp(W_MAX):g}), "
        "IP_b the band's mean Interpolation Pressure at 8x the trained context: high-frequency bands (high IP) get "
        f"tight windows. Where the band's median TIR_W > 1, g_min drops to 1 / TIR_W (not below {G_FLOOR:g}) so the "
        "scale can shrink an inflated tail.")
MODE_HELP = {"shared": "W_Q x g, W_K x g: the band's logits x g^2 (a per-band attention temperature)",
             "symmetric": "W_Q x g, W_K / g: logits unchanged in exact arithmetic; only the quantizer can see it"}
WINDOW_RANGE = (0.25, 4.0)


def scale_key(b: int) -> str:
    return f"w:qroar.g{b}"


def window_key(b: int) -> str:
    return f"w:qroar.window{b}"


def effective(values, base):
    """The scales the model gets: the sliders' values, or over per-layer scales `base` each layer's times the band's
    multiplier."""
    if base is None:
        return list(values)
    return [[g * m for g, m in zip(row, values)] for row in base]


def multipliers(scales, base):
    """Per-band multipliers m with scales = base x m in every layer, or None when the scales are not of that form."""
    m = [g / b for g, b in zip(scales[0], base[0])]
    ok = len(scales) == len(base) and all(math.isclose(g, b * x, rel_tol=1e-9) for row, brow in zip(scales, base)
                                          for g, b, x in zip(row, brow, m))
    return m if ok else None


def set_scale(b: int, scales: tuple, window: tuple, base=None) -> None:
    new = list(scales)
    new[b] = min(max(float(st.session_state[scale_key(b)]), window[0]), window[1])  # the slider's grid may overhang
    state.put("scales", effective(new, base))


def set_window(b: int, windows: list) -> None:
    lo, hi = st.session_state[window_key(b)]
    new = [list(p) for p in windows]
    new[b] = [min(float(lo), 1.0), max(float(hi), 1.0)]  # a window always holds 1 (the unscaled model)
    state.put("windows", new)


st.title("Tune")
st.caption("Move one scale per RoPE band and watch long-context perplexity respond. The scales multiply the band's "
           "rows of W_Q and W_K in every layer and head; moving one re-computes only that band's rows.")

info = w.need_model()
st.markdown(w.settings_summary())
n_pairs = int(info["rotary_dim"]) // 2

c1, c2, c3, c4 = st.columns([1.3, 1.1, 1.4, 1.2])
with c1:
    w.slider("Bands", "bands.n_bands", min_value=min(4, n_pairs), max_value=min(16, n_pairs), step=1,
             help="Log-spaced bands over the RoPE pairs (b0 = highest frequency). Changing the count resets the scales.")
with c2:
    w.radio("Band edges", "bands.align", ["log", "yarn"], horizontal=True,
            help="yarn: edges also on YaRN's ramp boundaries, so no band mixes kept and interpolated pairs.")
with c3:
    mode = w.radio("Mode", "scale.mode", ["shared", "symmetric"], horizontal=True, help=" · ".join(
        f"{k}: {v}" for k, v in MODE_HELP.items()))
with c4:
    w.radio("Order", "scale.order", ["before", "after"], horizontal=True,
            format_func=lambda o: f"{o} quantization",
            help="before: the scaled rows are quantized; after: the dequantized rows are scaled.")

try:
    recipe, corpus = state.recipe(), state.corpus_spec()
    base_cfg = state.eval_config()
    cfg = replace(base_cfg, max_windows_per_doc=int(state.get("qroar.max_windows")) or base_cfg.max_windows_per_doc)
    geo = loaded_entry(state.backend(), state.loaded_key()).wb.geometry
    edges = recipe_mod.band_edges(recipe, geo).edges
    diag = state.result("diagnostics")
    tir = matching_tir(diag.result if diag is not None else None, edges, recipe.pi)
    windows = recipe_mod.windows(recipe, geo, tir)
    note = recipe_mod.invariance_note(recipe, geo)
except QroarError as e:
    st.error(str(e), icon=":material/error:")
    w.link("setup", "Check the settings on Setup", ":material/tune:")
    st.stop()

if note:
    st.warning(f"**This setting cannot change the quantized model beyond rounding.** {note}", icon=":material/warning:")

B = len(edges) - 1
base = None  # per-layer scales (from a per-layer search or a scales file): the sliders move a per-band multiplier
if recipe.per_layer and len(recipe.scales[0]) == B:
    base = state.get("qroar.layer_base")
    mult = multipliers(recipe.scales, base) if base is not None and len(base[0]) == B else None
    if mult is None:  # new per-layer scales: they become the base, the multipliers start at 1
        base = [list(r) for r in recipe.scales]
        state.put("qroar.layer_base", base)
        mult = [1.0] * B
    scales = tuple(mult)
else:
    scales = recipe.scales if recipe.scales is not None and not recipe.per_layer and len(recipe.scales) == B else (1.0,) * B
exact = [(float(lo), float(hi)) for lo, hi in zip(windows["g_min"], windows["g_max"])]
inside = tuple(min(max(g, lo), hi) for g, (lo, hi) in zip(scales, exact))
if inside != scales:  # a window moved past a scale: the scale follows
    state.put("scales", effective(inside, base))
scales = inside
recipe = state.recipe().with_scales(effective(scales, base))

left, right = st.columns([1, 2.2], gap="large")
with left:
    if base is None:
        st.markdown("**Scale per band** g_b, inside its window G_b")
    else:
        st.markdown("**Multiplier per band** m_b over the per-layer scales, inside the window G_b")
        st.caption(f"Per-layer scales ({len(base)} layers x {B} bands) are set: each slider multiplies band b's scale "
                   "in every layer (the model gets per-layer scale x m_b; the heatmap below shows them).")
    for b, (lo, hi) in enumerate(exact):
        st.session_state[scale_key(b)] = scales[b]  # the stored scale, not the widget's memory (see app.widgets)
        st.slider(f"b{b} · pairs {windows.at[b, 'pairs']}", min_value=math.floor(lo * 1000) / 1000,
                  max_value=math.ceil(hi * 1000) / 1000, step=0.001, format="%.3f",
                  key=scale_key(b), on_change=set_scale, args=(b, scales, (lo, hi), base))
    if st.button("Reset scales to 1", icon=":material/restart_alt:", width="stretch"):
        state.put("scales", None)
        st.rerun()
    run = st.button("Run now", icon=":material/play_arrow:", width="stretch", type="primary")
    w.toggle("Re-run on every move", "qroar.auto_run")
    w.toggle("Also FP + scales (control)", "qroar.control",
             help="Shared mode is a per-band attention temperature: if FP + scales improves as much as PTQ + scales, "
                  "the gain is not a repair of quantization noise. Costs one more evaluation per move.")
    w.number("Documents per re-run (0 = all)", "qroar.max_docs", min_value=0, step=1,
             help="Live tuning on the first documents of the corpus keeps a move near a second on a CPU; "
                  "Search and Perplexity use every document.")
    w.number("Windows per document and length (0 = as on Setup)", "qroar.max_windows", min_value=0, step=1,
             help="Fewer windows keep each re-run quick; Perplexity on its own page uses the Setup value.")

    def _forwards(sizes_of, spec):
        from qroar.preflight import eval_forwards

        n_docs = int(state.get("qroar.max_docs") or 0)
        sizes = sizes_of(corpus)[:n_docs or None]
        passes = 1 + bool(state.get("qroar.control"))  # scaled (and the control); fp and quant are re-used
        fw = eval_forwards(sizes, cfg.lengths, spec.bos, cfg.stride, cfg.max_windows_per_doc)
        per = ", ".join(f"{n} x {length}" for n, length in fw if n)
        return [(n * passes, length) for n, length in fw], f"{passes} x ({per}) windows x tokens"

    w.cost(_forwards, "Each move")

# One job per distinct setting: a move while a run is going cancels that run and queues the new one.
sig = repr((state.loaded_key(), recipe, corpus, cfg, state.get("qroar.control"), state.get("qroar.max_docs")))
last = state.job("tune")
if run or (state.get("qroar.auto_run") and (last is None or last.meta.get("sig") != sig)):
    if last is not None and not last.is_finished:
        state.backend().queue.cancel(last.id)
    base = state.result("tune")
    fn = tune_job(state.backend(), state.loaded_key(), recipe, corpus, cfg,
                  base.result if base is not None else None, control=bool(state.get("qroar.control")),
                  max_docs=int(state.get("qroar.max_docs") or 0))
    state.submit("tune", fn, label=f"Perplexity with scales at {len(cfg.lengths)} length(s)",
                 meta={"sig": sig, "pi": recipe.pi.label(), "quant": recipe.quant.describe()})

with right:
    current = w.job_status("tune")
    job = state.result("tune")
    if job is None:
        if current is None:
            st.info("Move a scale or press **Run now** to measure FP, PTQ and PTQ + scales.", icon=":material/info:")
    else:
        res = job.result
        prev = state.session().previous.get("tune") if job is current else None
        previous = prev.result.summary if prev is not None and prev.result.base_key == res.base_key \
            and prev.result.recipe != res.recipe else None
        if job is not current:
            st.caption(":material/history: Showing the last finished run while the new one computes.")
        st.plotly_chart(qc.tune_figure(res.summary, res.trained_context, previous=previous, table=res.table),
                        width="stretch")
        table = qc.change_table(res.summary, res.table)
        st.dataframe(table, hide_index=True, width="stretch", column_order=[c for c in qc.CHANGE_ORDER if c in table], column_config={
            "length": st.column_config.NumberColumn("length", format="%d"),
            **{c: st.column_config.NumberColumn(qc.CHANGE_LABELS.get(c, c), format="%.4f") for c in table if c.startswith("ppl")},
            **{c: st.column_config.NumberColumn(qc.CHANGE_LABELS.get(c, c), format="%+.3f%%") for c in table if c.endswith(" %")},
            **{c: st.column_config.TextColumn(qc.CHANGE_LABELS.get(c, c)) for c in table if c.endswith(" 95%")},
        })
        if qc.change_note(table):
            st.caption(qc.change_note(table))
        shown = describe_scales(res.recipe.scales, 4)
        tokens = int(res.summary.loc[res.summary["variant"] == "quant_scaled", "tokens"].sum())
        st.caption(f"Scales of this run: {shown} · {res.recipe.scale.mode}, {res.recipe.scale.order} quantization · "
                   f"{tokens:,} tokens per curve · {res.seconds:.1f} s" + (" (FP and PTQ re-used)" if res.reused_base else ""))
        if res.note and res.note != note:  # the warning above already says it for the current settings
            st.caption(f":material/info: This run: {res.note}")

st.subheader("Scales and windows")
st.plotly_chart(qc.scales_figure(scales, windows), width="stretch")
if base is not None:
    st.caption("Bars: the per-band multipliers m_b. The scales the model gets, per layer (per-layer scale x m_b):")
    st.plotly_chart(qc.layer_scales_figure(effective(scales, base)), width="stretch")
st.caption(RULE)
if tir is not None:
    st.caption(":material/check: TIR_W from this session's diagnostics (same bands and PI) is part of the rule.")
else:
    st.caption(":material/info: Windows from IP alone: run Diagnostics with these bands "
               f"({B} {recipe.bands.align}) and this PI to add TIR_W.")
st.dataframe(windows[["band", "pairs", "ip", "tir", "g_min", "g_max", "reason"]], hide_index=True, width="stretch",
             column_config={"ip": st.column_config.NumberColumn("IP", format="%.3g"),
                            "tir": st.column_config.NumberColumn("TIR_W", format="%.3f"),
                            "g_min": st.column_config.NumberColumn("g_min", format="%.4f"),
                            "g_max": st.column_config.NumberColumn("g_max", format="%.4f")})

with st.expander("Move the windows", icon=":material/width:"):
    st.caption("Each window must hold 1 (the unscaled model). Search uses these windows too.")
    pairs = [[float(windows.at[b, "g_min"]), float(windows.at[b, "g_max"])] for b in range(B)]
    cols = st.columns(4)
    for b in range(B):
        st.session_state[window_key(b)] = (max(pairs[b][0], WINDOW_RANGE[0]), min(pairs[b][1], WINDOW_RANGE[1]))
        cols[b % 4].slider(f"G_b{b}", min_value=WINDOW_RANGE[0], max_value=WINDOW_RANGE[1], step=0.01, format="%.2f",
                           key=window_key(b), on_change=set_window, args=(b, pairs))
    if st.button("Windows back to the rule", icon=":material/restart_alt:", disabled=not windows["moved"].any()):
        state.put("windows", None)
        st.rerun()
