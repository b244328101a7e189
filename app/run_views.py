"""Streamlit pieces for runs, shared by the Runs, Perplexity and Diagnostics pages: the picker of runs to
compare (one choice per session, kept on its RunStore), the settings that differ, and the overlays.
Data and figures come from app.runs and app.run_charts; nothing is computed here.
"""

from __future__ import annotations

import time

import streamlit as st

from app import run_charts, state, widgets as w
from app.runs import Run, RunStore, curves_frame, diagnostics_frame, kinds_with, runs_diff, trained_context


def store() -> RunStore:
    return state.session().runs


def _label(run: Run) -> str:
    return f"{run.name} ({time.strftime('%H:%M:%S', time.localtime(run.created))})"


def _keep_choice(key: str, shown: list[str]) -> None:
    s = store()
    s.choose([i for i in s.chosen if i not in shown] + list(st.session_state[key]))  # choices not shown here stay


def picker(label: str, kinds: tuple[str, ...] | None = None, key: str = "runs.pick", **kw) -> list[Run]:
    """A multiselect of the session's runs (newest first), bound to the store's chosen runs; returns the chosen."""
    s = store()
    runs = list(reversed(s.runs(kinds)))
    ids, by_id = [r.id for r in runs], {r.id: r for r in runs}
    st.session_state[key] = [i for i in s.chosen if i in by_id]
    st.multiselect(label, ids, format_func=lambda i: _label(by_id[i]), key=key, on_change=_keep_choice,
                   args=(key, ids), **kw)
    return [r for r in s.chosen_runs() if r.id in by_id]


def differences(runs: list[Run]) -> None:
    """The settings that differ between the chosen runs (one column per run)."""
    if len(runs) < 2:
        st.caption("Choose two or more runs to see the settings that differ.")
        return
    diff = runs_diff(runs)
    if diff.empty:
        st.caption("The chosen runs ran with the same settings.")
    else:
        st.markdown("**Settings that differ**")
        st.dataframe(diff, hide_index=True, width="stretch")


def _none_yet(what: str) -> None:
    st.caption(f"Choose runs to overlay {what}. Every finished result of this session is kept as a run: "
               "rename, pin or delete them on the Runs page.")
    link()


def perplexity_overlay(log_y: bool = False) -> None:
    """On the Perplexity page: the chosen runs' perplexity curves in one chart, and their differences."""
    kinds = kinds_with("curves")
    if not store().runs(kinds):
        return
    st.subheader("Compare runs")
    chosen = picker("Runs to overlay", kinds, key="runs.pick.perplexity")
    if not chosen:
        _none_yet("their perplexity curves")
        return
    st.plotly_chart(run_charts.perplexity_overlay(curves_frame(chosen), trained_context(chosen), log_y=log_y),
                    width="stretch")
    differences(chosen)


def diagnostics_overlay(mode: str = "isolated") -> None:
    """On the Diagnostics page: the chosen runs' TIR_W and IP overlaid, logit noise side by side."""
    kinds = kinds_with("diagnostics")
    if not store().runs(kinds):
        return
    st.subheader("Compare runs")
    chosen = picker("Diagnostics runs to compare", kinds, key="runs.pick.diagnostics")
    if not chosen:
        _none_yet("their diagnostics")
        return
    tir, noise = diagnostics_frame(chosen, "tir"), diagnostics_frame(chosen, "logit_noise_pooled")
    if len(tir) and (tir["kind"] == "W").any():
        st.plotly_chart(run_charts.tir_overlay(tir, "W"), width="stretch")
    if len(noise) and (noise["mode"] == mode).any():
        st.plotly_chart(run_charts.noise_overlay(noise, mode), width="stretch")
    st.plotly_chart(run_charts.ip_overlay(diagnostics_frame(chosen, "ip")), width="stretch")
    differences(chosen)


def link() -> None:
    w.link("runs", "All runs of this session", ":material/compare_arrows:")
