"""Report: the whole session in one self-contained HTML file (settings, figures, tables, scales, commands)."""

import time

import streamlit as st

from app import report, state, widgets as w
from qroar.errors import QroarError

st.title("Report")
st.caption("One HTML file with this session's settings, every figure (interactive, works offline), the tables, "
           "the chosen scales and the `qroar` commands that reproduce the results. Figures also as PNG.")

info = w.need_model()
st.markdown(w.settings_summary())

try:
    source = state.chosen_scales()  # the latest scales the user produced (Tune or Search), or the one picked on Export
    recipe = source["recipe"] if source is not None else state.recipe()
    settings = report.ReportSettings(model=state.loaded_key().to_dict(), recipe=recipe.to_dict(),
                                     corpus=state.corpus_spec(), eval=state.eval_config().to_dict(), model_info=info,
                                     scales_from=source["label"] if source is not None else None)
except QroarError as e:
    st.error(f"{e} The report needs valid settings.", icon=":material/error:")
    st.stop()

jobs = {k: state.result(k) for k in report.KINDS}
results = {k: j.result for k, j in jobs.items() if j is not None}
try:
    parts = report.sections(results, settings)
except QroarError as e:
    st.error(str(e), icon=":material/error:")
    st.stop()

chosen = state.session().runs.chosen_runs()  # runs chosen on the Runs page: side by side, each with its settings
if chosen and st.toggle(f"Include the {len(chosen)} run(s) chosen on the Runs page: "
                        + ", ".join(r.name for r in chosen), value=True, key="report.runs"):
    parts = report.with_runs(parts, chosen, settings)
elif not chosen:
    st.caption("To put several runs side by side in the report, choose them on the Runs page.")

st.subheader("Contents")
cols = st.columns(len(report.KINDS))
for col, kind in zip(cols, report.KINDS):
    j = jobs[kind]
    col.markdown(f":material/check_circle: **{kind.capitalize()}**  \n{time.strftime('%H:%M', time.localtime(j.finished))}"
                 if j else f":material/radio_button_unchecked: {kind.capitalize()}  \nnot run yet")
if not results:
    st.info("No results yet: the report holds the settings and the command line only. Run Perplexity, Diagnostics, Tune, "
            "Search, Fidelity or Retrieval first.", icon=":material/info:")

name = "".join(c if c.isalnum() or c in "-_" else "-" for c in settings.model["name"].rsplit("/", 1)[-1])
st.download_button("Download the HTML report", lambda: report.build_html(parts), file_name=f"qroar-report-{name}.html",
                   mime="text/html", type="primary", icon=":material/download:", on_click="ignore")

st.subheader("Reproduce")
st.code("\n\n".join(parts[-1].code), language="bash")  # the report's last section gathers every command

figures = [(part.title, fig_name, fig) for part in parts for fig_name, fig in part.figures]
if figures:
    st.subheader("Figures as PNG")
    browser = report.find_browser()
    if browser is None:
        st.caption("PNG export needs Chrome or Chromium on this server (Debian: `apt-get install chromium`); "
                   "the HTML report has every figure without it.")
    grid = st.columns(3)
    for i, (title, fig_name, fig) in enumerate(figures):
        grid[i % 3].download_button(f"{title}: {fig_name.replace('_', ' ')}", lambda fig=fig: report.figure_png(fig),
                                    file_name=f"qroar-{title.lower()}-{fig_name}.png", mime="image/png",
                                    icon=":material/image:", disabled=browser is None, on_click="ignore",
                                    width="stretch", key=f"png:{title}:{fig_name}")
