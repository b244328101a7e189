"""Fidelity & retrieval: KL to full precision and same top token by position, and passkey retrieval heatmaps."""

import streamlit as st

from app import fidelity_charts as fc, state, widgets as w
from app.engine import fidelity_job, recipe_variants, retrieval_job
from qroar.errors import ConfigError, QroarError
from qroar.preflight import parse_lengths

# This page's settings; the defaults are the CLI's (about 12 s and 13 s on the embedded model, 2 CPU cores).
for _name, _value in {"fid.lengths": "", "fid.max_docs": 4, "fid.nopi": False,
                      "ret.lengths": "", "ret.depths": "0,0.25,0.5,0.75,1", "ret.trials": 2,
                      "ret.generate": False, "ret.score": "token_acc", "ret.key": "digits", "ret.digits": 5,
                      "ret.haystack": "corpus", "ret.seed": 0}.items():
    state.DEFAULTS.setdefault(_name, _value)

st.title("Fidelity & retrieval")
st.caption("How far each variant's next-token distribution is from full precision's under the same PI, position "
           "by position, and whether it still finds a key hidden in a long prompt. PTQ, PTQ + scales (when scales "
           "are set) and FP + scales as the control.")

info = w.need_model()
trained = int(info["trained_context"])
st.markdown(w.settings_summary())
recipe = state.recipe()


def _lengths(name: str, multiples) -> tuple[int, ...]:
    return parse_lengths(state.get(name), "Lengths") or tuple(trained * k for k in multiples)


def _depths() -> tuple[float, ...]:
    text = state.get("ret.depths")
    try:
        return tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"Depths expects comma-separated numbers in [0, 1], e.g. 0,0.5,1; got {text!r}.") from e


def fidelity_config():
    from qroar.fidelity import FidelityConfig

    return FidelityConfig(lengths=_lengths("fid.lengths", (1, 4, 8)), max_windows_per_doc=1,
                          max_docs=int(state.get("fid.max_docs")) or None, nopi=bool(state.get("fid.nopi")) and recipe.pi.rope_type != "default")


def retrieval_config():
    from qroar.retrieval import RetrievalConfig

    return RetrievalConfig(lengths=_lengths("ret.lengths", (1, 2, 4)), depths=_depths(),
                           trials=int(state.get("ret.trials")), corpus=state.corpus_spec(),
                           generate=bool(state.get("ret.generate")), key=state.get("ret.key"),
                           digits=int(state.get("ret.digits")), haystack=state.get("ret.haystack"),
                           seed=int(state.get("ret.seed")))


# ----------------------------------------------------------------------------- fidelity

st.header("Fidelity to full precision")
variants = recipe_variants(recipe)
c1, c2, c3 = st.columns(3)
with c1:
    w.text("Lengths", "fid.lengths", placeholder=f"{trained},{4 * trained},{8 * trained}",
           help="Comma-separated; windows are cut at the longest, each length reports its prefix. Empty: 1x, 4x, 8x "
                "the trained context.")
with c2:
    w.number("Documents", "fid.max_docs", min_value=0, max_value=64, step=1, help="One window each; 0 = every document.")
with c3:
    w.toggle("Also against FP without PI", "fid.nopi", disabled=recipe.pi.rope_type == "default",
             help="Inside the trained context: how far PI itself moves the model.")


def _fid_forwards(sizes_of, spec):
    from qroar.preflight import windows_count

    cfg = fidelity_config()
    counts = [c for c in (windows_count(n, cfg.length, spec.bos, None, 1) for n in sizes_of(state.corpus_spec())) if c]
    n = sum(counts[:cfg.max_docs])
    passes = 1 + len(variants)
    return [(n * passes, cfg.length)], f"{passes} x {n} windows x {cfg.length} tokens"


if variants:
    w.cost(_fid_forwards, "Fidelity run")
else:
    st.info("Nothing to compare with full precision: choose a quantizer on Setup, or set scales on Tune.",
            icon=":material/info:")
if st.button("Run fidelity", type="primary", icon=":material/play_arrow:", disabled=w.is_running("fidelity") or not variants):
    try:
        cfg, corpus = fidelity_config(), state.corpus_spec()
        fn = fidelity_job(state.backend(), state.loaded_key(), recipe, corpus, cfg)
    except QroarError as e:
        st.error(str(e), icon=":material/error:")
    else:
        state.submit("fidelity", fn, label=f"Fidelity to {cfg.length} tokens",
                     meta={"pi": recipe.pi.label(), "quant": recipe.quant.describe(), "corpus": corpus})
        st.rerun()

current = w.job_status("fidelity")
job = state.result("fidelity")
if job is not None:
    res = job.result
    if job is not current:
        st.caption(":material/history: Showing the previous result.")
    st.plotly_chart(fc.fidelity_figure(res.buckets, res.settings["trained_context"]), width="stretch")
    st.dataframe(fc.overall_table(res.overall), hide_index=True, width="stretch")
    st.caption(f"PI {job.meta.get('pi')} · {job.meta.get('quant')} · {len(res.windows)} window(s) of "
               f"{max(res.settings['config']['lengths'])} tokens · {res.settings['seconds']:.1f} s. KL in nats per token "
               "(± its standard error); the dashed line is the trained context.")
    st.download_button("Download the position table (CSV)", res.buckets.to_csv(index=False),
                       file_name="qroar_fidelity_buckets.csv", mime="text/csv", icon=":material/download:")

# ----------------------------------------------------------------------------- retrieval

st.header("Passkey retrieval")
c1, c2, c3, c4 = st.columns(4)
with c1:
    w.text("Prompt lengths", "ret.lengths", placeholder=f"{trained},{2 * trained},{4 * trained}",
           help="Comma-separated prompt lengths in tokens. Empty: 1x, 2x, 4x the trained context.")
with c2:
    w.text("Depths", "ret.depths", help="Where the key sits in the prompt, 0 = start, 1 = end.")
with c3:
    w.number("Trials", "ret.trials", min_value=1, max_value=32, step=1, help="Prompts per length and depth.")
with c4:
    w.toggle("Greedy generation too", "ret.generate", help="Also generate the key greedily, scored by exact match.")
with st.expander("Key, haystack and seed"):
    from qroar.retrieval import HAYSTACKS, KEYS

    k1, k2, k3, k4 = st.columns(4)
    with k1:
        w.radio("Key", "ret.key", list(KEYS), format_func=lambda k: KEYS[k].label, help="What is hidden in the haystack.")
    with k2:
        w.number("Digits", "ret.digits", min_value=1, max_value=64, step=1, disabled=state.get("ret.key") != "digits",
                 help="Length of a digits key.")
    with k3:
        w.radio("Haystack", "ret.haystack", list(HAYSTACKS), format_func=lambda h: HAYSTACKS[h],
                help="Corpus text (the documents chosen on Setup) or the classic repeated filler.")
    with k4:
        w.number("Seed", "ret.seed", min_value=0, step=1,
                 help="Draws the keys and the haystack offsets: the same seed rebuilds the same prompts.")
ret_variants = ["fp", *recipe_variants(recipe)]


def _ret_forwards(sizes_of, spec):
    cfg = retrieval_config()
    n = len(cfg.depths) * cfg.trials * len(ret_variants)
    return [(n, L) for L in cfg.lengths], f"{len(ret_variants)} variant(s) x {len(cfg.depths) * cfg.trials} prompts per length"


w.cost(_ret_forwards, "Retrieval run")
if st.button("Run retrieval", type="primary", icon=":material/play_arrow:", disabled=w.is_running("retrieval")):
    try:
        cfg = retrieval_config()
        fn = retrieval_job(state.backend(), state.loaded_key(), recipe, cfg)
    except QroarError as e:
        st.error(str(e), icon=":material/error:")
    else:
        state.submit("retrieval", fn, label=f"Passkey retrieval at {len(cfg.lengths)} length(s)",
                     meta={"pi": recipe.pi.label(), "quant": recipe.quant.describe()})
        st.rerun()

current = w.job_status("retrieval")
job = state.result("retrieval")
if job is None:
    st.stop()
if job is not current:
    st.caption(":material/history: Showing the previous result.")
res = job.result
scores = [s for s in fc.SCORES if s != "gen_exact" or res.settings["config"]["generate"]]
score = w.select("Score", "ret.score", scores, format_func=lambda s: fc.SCORES[s][0])
change = None
if {"quant", "quant_scaled"} <= set(res.trials["variant"]):
    from qroar.retrieval import paired_change

    change = paired_change(res.trials, col=score)
st.plotly_chart(fc.passkey_figure(res.summary, change, score), width="stretch")
st.dataframe(fc.passkey_table(res.summary), hide_index=True, width="stretch")
st.caption(f"PI {job.meta.get('pi')} · {job.meta.get('quant')} · {len(res.trials)} scored prompts · "
           f"{res.settings['seconds']:.1f} s. Rows: the key's depth in the prompt; columns: the prompt's length.")
st.download_button("Download every prompt's scores (CSV)", res.trials.to_csv(index=False),
                   file_name="qroar_passkey.csv", mime="text/csv", icon=":material/download:")
