"""Search: coordinate descent over the bands inside their windows, judged on held-out documents."""

import json
import math

import streamlit as st

from app import qroar_charts as qc, state, widgets as w
from app.charts import length_label
from app.engine import loaded_entry, matching_tir, search_job
from qroar import recipe as recipe_mod
from qroar.errors import QroarError
from qroar.recipe import Recipe
from qroar.search import OBJECTIVES, STRATEGIES, SearchConfig, candidates
FOLDS = (0, 2, 3, 4, 5)


def weight_key(n: int) -> str:
    return f"w:search.weight{n}"


def set_weight(n: int) -> None:
    weights = dict(state.get("search.weights") or {})
    weights[str(n)] = float(st.session_state[weight_key(n)])
    state.put("search.weights", weights)


def use_on_tune(result) -> None:
    """The searched recipe (its bands, mode, order, windows and the chosen scales) becomes the session's."""
    state.set_recipe(Recipe.from_dict(result.recipe))


st.title("Search")
st.caption("Q-ROAR's search: for each band in turn, try a few scales inside its window with the other bands fixed, "
           "keep the one with the lowest length-weighted log-perplexity on the dev documents, unless it raises "
           "short-context perplexity past the guard. Results are reported on held-out documents.")

info = w.need_model()
trained = int(info["trained_context"])
n_pairs = int(info["rotary_dim"]) // 2
st.markdown(w.settings_summary())

try:
    recipe = state.recipe()
    geo = loaded_entry(state.backend(), state.loaded_key()).wb.geometry
    edges = recipe_mod.band_edges(recipe, geo).edges
    diag = state.result("diagnostics")
    windows = recipe_mod.windows(recipe, geo, matching_tir(diag.result if diag is not None else None, edges, recipe.pi))
    note = recipe_mod.invariance_note(recipe, geo)
except QroarError as e:
    st.error(str(e), icon=":material/error:")
    st.stop()
if note:
    st.warning(f"**A search cannot change this model beyond rounding, so it will not start.** {note}",
               icon=":material/warning:")
st.caption(f"Bands, mode, order and windows come from Tune: {len(edges) - 1} {recipe.bands.align} bands, "
           f"{recipe.scale.mode} mode, {recipe.scale.order} quantization"
           + (", windows moved by hand" if windows["moved"].any() else ", windows by the rule") + ".")
w.link("tune", "Change them on Tune", ":material/tune:")

with st.expander("Search settings", expanded=state.job("search") is None, icon=":material/tune:"):
    c1, c2, c3 = st.columns(3)
    with c1:
        w.slider("Candidates per band", "search.n_candidates", min_value=5, max_value=9, step=1,
                 help="Log-spaced scales inside the window; the one nearest 1 is exactly 1.")
        w.radio("Sweeps over the bands", "search.sweeps", [1, 2], horizontal=True)
        w.select("k-fold stability", "search.k_folds", FOLDS, format_func=lambda k: "off" if k == 0 else f"{k} folds",
                 help="Search again on k subsets of the dev documents and report the spread of the chosen scales.")
        w.radio("Strategy", "search.strategy", list(STRATEGIES), horizontal=True,
                help=" · ".join(f"{k}: {v.label}" for k, v in STRATEGIES.items()) + ". Racing scores every candidate "
                     "on the first dev document, then only the best third that beat the current scale on more documents "
                     "(1, 3, 9, ..., all): several times cheaper on many documents; it can miss a candidate that wins "
                     "only on later documents. Gradient: Adam steps on one log-scale per band (the scales as parameters "
                     "of the quantized model), stopped early on dev documents held back from training; grad-layer "
                     "gives every layer its own band scales. Measured on SmolLM2-135M (YaRN x4 / x8, RTN W4 per channel, "
                     "held-out documents): racing -1.4% / -4.5%, per-layer gradient -20.9% / -31.1% "
                     "(docs/results/methods-smollm2-135m.md).")
        if state.get("search.strategy") == "layer":
            n_layers = int(info.get("n_layers") or 1)
            w.number("Layer groups", "search.layer_groups", min_value=1, max_value=n_layers, step=1,
                     help=f"Contiguous groups of layers, each with its own band scales after the shared descent "
                          f"({n_layers} = every layer its own). More groups: more evaluations, and more room to "
                          "overfit the dev documents; the held-out numbers decide.")
        if state.get("search.strategy") in ("grad", "grad-layer"):
            g1, g2 = st.columns(2)
            with g1:
                w.number("Gradient steps", "search.grad_steps", min_value=1, max_value=500, step=1,
                         help="At most this many Adam steps; early stopping on held-back dev documents may end sooner.")
            with g2:
                w.number("Learning rate", "search.grad_lr", min_value=0.001, max_value=1.0, step=0.01, format="%.3f",
                         help="Adam's step size on the log-scales (0.02: about 2% per step at most).")
        w.select("Objective", "search.objective", list(OBJECTIVES), format_func=lambda k: OBJECTIVES[k].label)
        w.toggle("Nested windows (one forward per window)", "search.nested",
                 help="Shorter lengths are scored on the prefixes of the longest windows, so every length costs one "
                      "forward at the longest. The same text at every length.")
    with c2:
        options = state.length_options(trained)
        lengths = w.multiselect("Context lengths (tokens)", "search.lengths", options,
                                value=state.get("search.lengths") or state.lengths(),
                                format_func=lambda n: f"{length_label(n)} ({n / trained:g}x)")
        custom = w.toggle("Custom weights per length", "search.custom_weights",
                          help="Off: weights proportional to length, so long contexts count most.")
        if custom and lengths:
            stored = state.get("search.weights") or {}
            wc = st.columns(min(len(lengths), 4))
            for i, n in enumerate(sorted(lengths)):
                st.session_state[weight_key(n)] = float(stored.get(str(n), n / min(lengths)))
                wc[i % len(wc)].number_input(length_label(n), min_value=0.0, step=1.0, format="%g", key=weight_key(n),
                                             on_change=set_weight, args=(n,))
        w.number("Short-context guard (%)", "search.guard_pct", min_value=0.0, max_value=100.0, step=0.1, format="%g",
                 help="Reject a scale that raises perplexity at the shortest length by more than this.")
    with c3:
        w.text("Dev corpus", "search.dev", help="embedded:dev, embedded:heldout, a text file or folder, or hf:name:config:split:field")
        w.text("Held-out corpus", "search.heldout", help="What the results are reported on: keep it apart from the dev corpus.")
        w.number("Windows per document and length (0 = all)", "search.max_windows", min_value=0, step=1)
        w.text("Checkpoint file (optional)", "search.checkpoint", placeholder="runs/search.json",
               help="Written after every evaluation. A search with the same settings and file resumes where it stopped.")



def search_config() -> SearchConfig:
    lengths = tuple(sorted(int(n) for n in (state.get("search.lengths") or state.lengths())))
    weights = None
    if state.get("search.custom_weights"):
        stored = state.get("search.weights") or {}
        weights = tuple(float(stored.get(str(n), n / lengths[0])) for n in lengths)
    checkpoint = state.get("search.checkpoint").strip() or None
    return SearchConfig(
        n_candidates=int(state.get("search.n_candidates")), sweeps=int(state.get("search.sweeps")),
        lengths=lengths, length_weights=weights, guard_tol=float(state.get("search.guard_pct")) / 100,
        dev_corpus=state.get("search.dev").strip(), heldout_corpus=state.get("search.heldout").strip(),
        max_windows_per_doc=int(state.get("search.max_windows")) or None,
        checkpoint=checkpoint, k_folds=int(state.get("search.k_folds")), strategy=state.get("search.strategy"),
        objective=state.get("search.objective"), nested=bool(state.get("search.nested")),
        layer_groups=int(state.get("search.layer_groups")), grad_steps=int(state.get("search.grad_steps")),
        grad_lr=float(state.get("search.grad_lr")))


def _forwards(sizes_of, spec):
    from qroar.preflight import search_plan

    c = search_config()
    per_band = [len(candidates(lo, hi, c.n_candidates)) - 1 for lo, hi in zip(windows["g_min"], windows["g_max"])]
    plan = search_plan(c, sizes_of(c.dev_corpus), sizes_of(c.heldout_corpus), per_band, spec.bos, recipe.quantized)
    return plan.forwards(), plan.line().removeprefix("plan: ").replace("search, at most", "at most", 1)


busy = w.is_running("search")
if not note:
    w.cost(_forwards, "This search", at_most=True)
if st.button("Start search", type="primary", icon=":material/play_arrow:", disabled=busy or bool(note)):
    try:
        cfg = search_config()
    except QroarError as e:
        st.error(str(e), icon=":material/error:")
    else:
        fn = search_job(state.backend(), state.loaded_key(), recipe, windows, cfg)
        # the count and its total (racing: at most, in document evaluations) come with the search's progress
        state.submit("search", fn, label=f"Search over {len(edges) - 1} bands" + (", racing" if cfg.race else ""),
                     meta={"cfg": cfg, "pi": recipe.pi.label(), "quant": recipe.quant.describe()})
        st.rerun()

current = w.job_status("search")
job = state.result("search")
if job is None:
    if current is None:
        st.info("Press **Start search**. On the default settings it evaluates every candidate of every band once "
                "(with racing, most only on the first dev document).",
                icon=":material/info:")
    st.stop()
if job is not current:
    st.caption(":material/history: Showing the previous search.")

r, cfg = job.result, job.meta["cfg"]
gain = r.heldout_gain()
kl_search = cfg.objective == "kld"
held_obj = r.objective["heldout"]
control = None if kl_search else qc.control_change(held_obj, r.heldout, cfg.weights())
m1, m0, m2, m3, m4 = st.columns(5)
m1.metric("Held-out objective vs PTQ", f"{100 * gain:+.3f}%",
          help=("Change of the length-weighted mean KL divergence to full precision (same PI); negative = closer to FP."
                if kl_search else "Length-weighted perplexity change; negative = better."))
if kl_search:  # FP has KL 0 to itself: the control is FP + scales' own KL, next to PTQ's
    fs = held_obj.get("fp_scaled")
    m0.metric("Control: FP + scales, KL to FP", "not measured" if fs is None else f"{fs:.4f}",
              help="Mean KL divergence (nats per token) of the same scales on the full-precision model to FP. "
                   f"PTQ's is {held_obj.get('quant', float('nan')):.4f}, PTQ + scales' "
                   f"{held_obj.get('quant_scaled', float('nan')):.4f}: scales that move FP as far as PTQ sits "
                   "change the model rather than repair quantization.")
    control = fs
else:
    m0.metric("Control: FP + scales vs FP", "not measured" if control is None else f"{100 * control:+.3f}%",
              help="The same scales on the full-precision model, held-out objective. If it moves as much as the gain "
                   "beside it, the gain is a per-band temperature effect, not a repair of quantization.")
dev = r.objective["dev"]
m2.metric("Dev objective vs PTQ", f"{100 * r.objective_change(dev['quant_scaled'], dev['quant']):+.3f}%")
m3.metric(f"{r.unit.capitalize()} (at most {r.budget})", f"{r.spent}" + (f" +{r.reused} resumed" if r.reused else ""),
          help=f"Computed in this run, in the unit the progress counted; {r.doc_evaluations} document evaluations in all "
               "(racing: candidates that lost on the first documents were not evaluated on the rest).")
m4.metric("Time", f"{r.seconds:.1f} s")
if control is None:
    st.caption(":material/info: This search result has no FP + scales run on the held-out documents, so the "
               "control beside the gain is not measured.")
if r.note:
    st.warning(f"**The change above is rounding noise, not a gain.** {r.note}", icon=":material/warning:")

st.subheader("Held-out perplexity")
table = qc.change_table(r.heldout)
fmt = {"length": st.column_config.NumberColumn("length", format="%d"),
       **{c: st.column_config.NumberColumn(qc.CHANGE_LABELS.get(c, c), format="%.4f") for c in table if c.startswith("ppl")},
       **{c: st.column_config.NumberColumn(qc.CHANGE_LABELS.get(c, c), format="%+.3f%%") for c in table if c.endswith(" %")}}
st.dataframe(table, hide_index=True, width="stretch", column_config=fmt)
st.caption(f"{cfg.heldout_corpus} · PI {job.meta['pi']} · {job.meta['quant']} · {r.scale_cfg.mode}, "
           f"{r.scale_cfg.order} quantization · guard {100 * cfg.guard_tol:g}%")
with st.expander("Dev perplexity (what the search optimised)"):
    st.dataframe(qc.change_table(r.dev), hide_index=True, width="stretch", column_config=fmt)

if st.button("Use these scales on Tune", icon=":material/tune:", type="primary"):
    use_on_tune(r)
    st.switch_page(w.page_path("tune"))

st.subheader("Chosen scales")
if qc.is_per_layer(r.scales):
    st.plotly_chart(qc.layer_scales_figure(r.scales), width="stretch")
    st.caption("Per-layer scales (layers x bands): the shared descent first, then each layer group's bands refined "
               "around it. Colour: log g (red above 1, blue below).")
else:
    st.plotly_chart(qc.scales_figure(r.scales, r.windows, r.folds), width="stretch")
if r.folds is not None:
    st.caption(f"k-fold stability: each fold searched on the dev documents outside it ({cfg.k_folds} folds). "
               "A small spread means the choice does not hinge on a few documents.")
    st.dataframe(r.folds, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(c, format="%.4f") for c in r.folds if c != "band"})

st.subheader("Search trace")
hist = r.history[r.history["fold"] == "all"]
if "step" in hist and hist["step"].notna().any():  # a gradient search: the objective against steps
    st.plotly_chart(qc.steps_figure(hist), width="stretch")
    st.caption("Each grey point is one step's training minibatch; the line is the objective on the dev documents "
               "held back for early stopping. The best point there that passes the guard is then evaluated on every "
               "dev document; the tables above are that evaluation.")
elif hist.empty:
    st.caption("No candidate besides 1 was tried (every window is [1, 1]).")
else:
    short = min(cfg.lengths)
    base_short = float(r.dev.query("variant == 'quant' and length == @short")["log_ppl"].iloc[0])
    st.plotly_chart(qc.trace_figure(hist, dev["quant"], base_short, cfg.guard_tol, r.scales), width="stretch")
    n_rej = int((~hist["guard_ok"].astype(bool)).sum())
    st.caption(f"{len(hist)} candidates tried on the dev documents, {n_rej} rejected by the guard (their longer "
               "lengths were not evaluated). Each point is one candidate with the other bands at their values then. "
               + qc.TRACE_CAPTION)

st.download_button("Download the search result (JSON)", json.dumps(r.to_dict(), indent=1, default=str),
                   file_name="qroar_search.json", mime="application/json", icon=":material/download:")
