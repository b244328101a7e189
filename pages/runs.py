"""Runs: every finished result of this session, named, with its settings; rename, pin, delete, compare."""

import streamlit as st

from app import run_views as rv
from app.run_charts import OVERLAY_TITLES
from app.runs import MAX_RUNS, comparison, runs_table
from qroar.errors import QroarError

st.title("Runs")
st.caption(f"Every Perplexity, Diagnostics, Tune and Search result of this session is kept as a run with the "
           f"settings it ran with (the last {MAX_RUNS}; pinned runs are dropped last). Choose two to compare them "
           "in one picture: \"no PI vs YaRN under 3-bit\", \"RTN vs AWQ\", \"before vs after Q-ROAR\". Tune re-runs "
           "on one set-up update one run: rename or pin it to keep it apart from the next moves.")

store = rv.store()
runs = store.runs()
if not runs:
    st.info("No runs yet: run Perplexity, Diagnostics, Tune or Search, and each result appears here.",
            icon=":material/info:")
    st.stop()

st.dataframe(runs_table(runs), hide_index=True, width="stretch", column_config={
    "id": None, "pinned": st.column_config.CheckboxColumn("pinned", width="small")})

with st.expander("Rename, pin or delete a run", icon=":material/edit:"):
    by_id = {r.id: r for r in runs}
    run_id = st.selectbox("Run", list(reversed(by_id)), format_func=lambda i: by_id[i].name, key="runs.manage")
    run = by_id[run_id]
    name = st.text_input("Name", value=run.name, key=f"runs.name:{run.id}")
    c1, c2, c3 = st.columns(3)
    try:
        if c1.button("Rename", icon=":material/edit:", width="stretch"):
            store.rename(run.id, name)
            st.rerun()
        if c2.button("Unpin" if run.pinned else "Pin", icon=":material/push_pin:", width="stretch"):
            store.pin(run.id, not run.pinned)
            st.rerun()
        if c3.button("Delete", icon=":material/delete:", width="stretch"):
            store.delete(run.id)
            st.rerun()
    except QroarError as e:
        st.error(str(e), icon=":material/error:")

st.subheader("Compare")
chosen = rv.picker("Runs to compare", key="runs.pick.all")
if not chosen:
    st.caption("Choose runs above: their settings that differ, and their results overlaid, appear here.")
    st.stop()
rv.differences(chosen)
_, figures = comparison(chosen)
for name, fig in figures.items():
    st.markdown(f"**{OVERLAY_TITLES.get(name, name)}**")
    st.plotly_chart(fig, width="stretch")
st.caption("The Report page can include the chosen runs, each with its settings, figures and tables.")
