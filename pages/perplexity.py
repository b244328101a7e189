"""Perplexity: full precision vs quantized, against context length, under the chosen PI."""

import streamlit as st

from app import charts, run_views, state, widgets as w
from app.engine import perplexity_job
from qroar.errors import QroarError

st.title("Perplexity")
st.caption("Token-level perplexity over windows of exactly L tokens, full precision vs quantized, under the "
           "position interpolation chosen on Setup. The penalty panel shows how much quantization costs at each length.")

info = w.need_model()
st.markdown(w.settings_summary())

c1, c2 = st.columns([1, 3], vertical_alignment="center")
busy = w.is_running("perplexity")
with c1:
    run = st.button("Run perplexity", type="primary", icon=":material/play_arrow:", disabled=busy, width="stretch")
with c2:
    w.link("setup", "Change settings on Setup", ":material/tune:")


def _forwards(sizes_of, spec):
    from qroar.preflight import eval_forwards

    cfg, corpus = state.eval_config(), state.corpus_spec()
    passes = 2 if state.recipe().quantized else 1  # full precision, and quantized when there is a quantizer
    fw = eval_forwards(sizes_of(corpus), cfg.lengths, spec.bos, cfg.stride, cfg.max_windows_per_doc)
    per = ", ".join(f"{n} x {length}" for n, length in fw if n)
    return [(n * passes, length) for n, length in fw], f"{passes} x ({per}) windows x tokens"


w.cost(_forwards, "Next run")

if run:
    try:
        recipe, corpus, cfg = state.recipe(), state.corpus_spec(), state.eval_config()
    except QroarError as e:
        st.error(str(e), icon=":material/error:")
    else:
        fn = perplexity_job(state.backend(), state.loaded_key(), recipe, corpus, cfg)
        state.submit("perplexity", fn, label=f"Perplexity at {len(cfg.lengths)} length(s)",
                     meta={"pi": recipe.pi.label(), "quant": recipe.quant.describe(), "corpus": corpus})
        st.rerun()

current = w.job_status("perplexity")
job = state.result("perplexity")
if job is None:
    if current is None:
        st.info("Press **Run perplexity** to measure. The first run on a model quantizes it; later runs re-use that.",
                icon=":material/info:")
    st.stop()
if job is not current:
    st.caption(":material/history: Showing the previous result.")

res = job.result
log_y = w.toggle("Log scale for perplexity", "view.log_y")
st.plotly_chart(charts.perplexity_figure(res.summary, res.trained_context, log_y=log_y), width="stretch")

table = charts.penalty_table(res.summary, res.trained_context)
st.dataframe(table, hide_index=True, width="stretch", column_config={
    "length": st.column_config.NumberColumn("length", format="%d"),
    "x trained": st.column_config.NumberColumn("x trained", format="%.3gx"),
    **{c: st.column_config.NumberColumn(c, format="%.3f") for c in table if c.startswith("ppl")},
    **{c: st.column_config.NumberColumn(c, format="%+.2f%%") for c in table if c.startswith("penalty")},
})
m = job.meta
st.caption(f"PI {m.get('pi')} · {m.get('quant')} · corpus {m.get('corpus')} · "
           f"{int(res.summary['tokens'].sum()):,} scored tokens · {res.seconds:.1f} s")

d1, d2 = st.columns(2)
d1.download_button("Download summary (CSV)", res.summary.to_csv(index=False), file_name="qroar_perplexity_summary.csv",
                   mime="text/csv", icon=":material/download:", width="stretch")
d2.download_button("Download per-document table (CSV)", res.table.to_csv(index=False), file_name="qroar_perplexity_documents.csv",
                   mime="text/csv", icon=":material/download:", width="stretch")

run_views.perplexity_overlay(log_y)  # earlier runs of this session on the same axes
