"""Widgets bound to settings, the running-job panel, and small shared cards.

Bound widgets keep their value in the session record (app.state), not in the widget itself:
Streamlit forgets a widget's state when a page that does not draw it runs, so values set on
Setup would otherwise be lost after a visit to another page.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from qroar.errors import QroarError

from app import state
from app.jobs import CANCELLED, FAILED, QUEUED, Job, panel_text

POLL_SECONDS = 1.0
PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"


def page_path(name: str) -> str:
    """The file of page `name` (e.g. "setup"), as st.Page and st.page_link want it."""
    return str(PAGES_DIR / f"{name}.py")


def link(page: str, label: str, icon: str | None = None) -> None:
    st.page_link(page_path(page), label=label, icon=icon)


# ----------------------------------------------------------------------------- bound widgets


def _key(name: str) -> str:
    return f"w:{name}"


def _store(name: str, allowed: list | None) -> None:
    value = st.session_state[_key(name)]
    if allowed is not None:  # the browser may send back labels of options that changed since (e.g. after a load)
        value = [v for v in value if v in allowed] if isinstance(value, list) else value
        if not isinstance(value, list) and value not in allowed:
            return
    state.put(name, value)


def _bind(name: str, value, allowed: list | None = None) -> dict:
    """Seed the widget from the stored setting and write changes back; kwargs for the widget call."""
    st.session_state[_key(name)] = value
    return dict(key=_key(name), on_change=_store, args=(name, allowed))


def select(label: str, name: str, options, **kw):
    options = list(options)
    value = state.get(name)
    if value not in options:  # e.g. a group size that does not divide the new model's widths
        value = kw.pop("fallback", options[0])
        state.put(name, value)
    kw.pop("fallback", None)
    return st.selectbox(label, options, **_bind(name, value, options), **kw)


def radio(label: str, name: str, options, **kw):
    options = list(options)
    value = state.get(name)
    if value not in options:
        value = options[0]
        state.put(name, value)
    return st.radio(label, options, **_bind(name, value, options), **kw)


def multiselect(label: str, name: str, options, value=None, **kw):
    """`value` overrides the stored setting for display (e.g. defaults derived from the model)."""
    options = list(options)
    chosen = [v for v in (value if value is not None else state.get(name) or []) if v in options]
    return st.multiselect(label, options, **_bind(name, chosen, options), **kw)


def number(label: str, name: str, **kw):
    return st.number_input(label, **_bind(name, state.get(name)), **kw)


def slider(label: str, name: str, **kw):
    return st.slider(label, **_bind(name, state.get(name)), **kw)


def toggle(label: str, name: str, **kw) -> bool:
    return st.toggle(label, **_bind(name, bool(state.get(name))), **kw)


def text(label: str, name: str, **kw) -> str:
    return st.text_input(label, **_bind(name, state.get(name) or ""), **kw)


# ----------------------------------------------------------------------------- jobs


def job_status(kind: str) -> Job | None:
    """Show this session's last job of `kind`: live progress while it runs, the error if it failed.

    Returns the job (finished or not) so the page can draw its result when `job.status == "done"`.
    """
    job = state.job(kind)
    if job is None:
        return None
    if not job.is_finished:
        _running(job.id)
    elif job.status == FAILED:
        st.error(job.error, icon=":material/error:")
    elif job.status == CANCELLED:
        st.warning(job.error or "Cancelled.", icon=":material/cancel:")
    return job


def is_running(kind: str) -> bool:
    job = state.job(kind)
    return job is not None and not job.is_finished


@st.fragment(run_every=POLL_SECONDS)
def _running(job_id: str) -> None:
    """Redrawn every POLL_SECONDS while the job runs; reruns the whole page once it has finished."""
    q = state.backend().queue
    job = q.get(job_id)
    if job is None or job.is_finished:
        st.rerun()
        return
    with st.container(border=True):
        bar, caption = panel_text(job, q.position(job))
        st.progress(0.0 if job.status == QUEUED else job.progress, text=bar)
        c1, c2 = st.columns([4, 1], vertical_alignment="center")
        c1.caption(caption)
        if c2.button("Cancel", key=f"cancel:{job.id}", icon=":material/stop_circle:", width="stretch"):
            q.cancel(job.id)
            st.rerun()


# ----------------------------------------------------------------------------- cards and guards


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def rope_text(params: dict, trained_context: int | None = None) -> str:
    """The model's own RoPE in words: `type` · theta · other parameters (empty ones left out) · context."""
    rp = {k: v for k, v in (params or {}).items() if v is not None and v != {} and v != []}
    parts = [f"`{rp.pop('rope_type', 'default')}`", f"theta {rp.pop('rope_theta', 10000):,g}"]
    parts += [f"{k} {v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k} {v}" for k, v in rp.items()]
    if trained_context:
        parts.append(f"context {trained_context:,}")
    return " · ".join(parts)


def model_card(info: dict, applied: str | None = None) -> None:
    """The loaded model in one bordered card: shape, context, RoPE as trained beside the position
    interpolation these settings apply (`applied`, a line of markdown), where it runs."""
    rp = info.get("rope_parameters") or {}
    with st.container(border=True):
        st.markdown(f"**{info['name']}** · `{info['model_type']}` · {info['device']} / {info['dtype']}")
        cols = st.columns(6)
        cols[0].metric("Parameters", _count(info["n_params"]))
        cols[1].metric("Layers", info["n_layers"])
        cols[2].metric("Heads (q / kv)", f"{info['n_heads']} / {info['n_kv_heads']}")
        cols[3].metric("Head dim", info["head_dim"] if info.get("rotary_dim", info["head_dim"]) == info["head_dim"]
                       else f"{info['head_dim']} ({info['rotary_dim']} rotary)")
        cols[4].metric("Trained context", f"{info['trained_context']:,}")
        cols[5].metric("RoPE theta", f"{rp.get('rope_theta', 10000):g}")
        r1, r2 = st.columns(2)
        r1.markdown(f"**RoPE as trained:** {rope_text(rp, info.get('trained_context'))}")
        r2.markdown(f"**Applied by the settings below:** {applied or 'nothing yet'}")
        st.caption(f"hidden {info['hidden_size']} · vocab {info['vocab_size']:,} · weights fingerprint `{info['fingerprint']}`")
        if info.get("devices"):
            table = device_table(info["devices"])
            st.dataframe(table, hide_index=True, width="stretch", column_config={
                "Modules": st.column_config.TextColumn("Modules", width="large", help="The model's modules held there"),
                **{c: st.column_config.TextColumn(c, width="small") for c in table if c not in ("Device", "Modules")}})


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc), else its peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def device_memory(devices: dict):
    """One row per device holding the model (ModelInfo.devices): its modules, the model's weights there, and
    the device's memory now: used / total (whole GPU, or RAM less MemAvailable) and this process's share
    (CUDA memory allocated, CPU resident set)."""
    import os

    import pandas as pd
    import torch

    GiB, rows = 1024**3, []
    for dev, d in devices.items():
        row = {"device": dev, "modules": ", ".join(d.get("modules", [])), "weights_gib": d.get("bytes", 0) / GiB,
               "used_gib": None, "total_gib": None, "this_process_gib": None}
        if dev.startswith("cuda") and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(torch.device(dev))
            row.update(used_gib=(total - free) / GiB, total_gib=total / GiB,
                       this_process_gib=torch.cuda.memory_allocated(torch.device(dev)) / GiB)
        elif dev == "cpu":
            rss = _rss_bytes()
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                total = None
            from qroar.perplexity import available_memory

            avail = available_memory(torch.device("cpu"))
            row.update(used_gib=None if avail is None or total is None else (total - avail) / GiB,
                       this_process_gib=None if rss is None else rss / GiB, total_gib=None if total is None else total / GiB)
        rows.append(row)
    return pd.DataFrame(rows, columns=["device", "modules", "weights_gib", "used_gib", "total_gib", "this_process_gib"])


DEVICE_COLUMNS = {"device": "Device", "modules": "Modules", "weights_gib": "Model weights", "used_gib": "In use on device",
                  "total_gib": "Device total", "this_process_gib": "This process"}


def _gib(x) -> str:
    return "—" if x is None or x != x else f"{x:,.2f} GiB"  # x != x: NaN


def _modules(names: list[str]) -> str:
    """Module names without the decoder's "model." prefix, so the cell stays short."""
    return ", ".join(n.removeprefix("model.") for n in names)


def device_table(devices: dict):
    """device_memory for reading: headers in words, sizes with units, "—" where a size is unknown."""
    raw = device_memory(devices)
    out = raw.rename(columns=DEVICE_COLUMNS)
    out["Modules"] = [_modules(d.get("modules", [])) for d in devices.values()]
    for c in ("weights_gib", "used_gib", "total_gib", "this_process_gib"):
        out[DEVICE_COLUMNS[c]] = [_gib(x) for x in raw[c]]
    return out


def need_model() -> dict:
    """The loaded model's info, or a pointer to Setup and a stop (pages call this first)."""
    info = state.model_info()
    if info is None:
        job = state.job("load")
        if job is not None and not job.is_finished:
            job_status("load")
        st.info("Load a model on the Setup page first.", icon=":material/info:")
        link("setup", "Go to Setup", ":material/tune:")
        st.stop()
    return info


def settings_summary() -> str:
    """One line naming what the next run will use (model, PI, quantizer, corpus, lengths)."""
    from app.charts import length_label

    parts = [f"**{state.loaded_key().name}**" if state.loaded_key() else "no model"]
    try:
        parts.append(f"PI {state.recipe().pi.label()}")
    except QroarError:  # an invalid setting is reported where it is edited
        parts.append("PI ?")
    try:
        parts.append(state.recipe().quant.describe())
    except QroarError:
        parts.append("quantizer ?")
    src = state.get("corpus.source")
    parts.append(state.CORPORA.get(src, src).lower() if src.startswith("embedded") else src)
    parts.append("lengths " + ", ".join(length_label(n) for n in state.lengths()))
    return " · ".join(parts)


def sidebar_status() -> None:
    """Session summary in the sidebar: model loaded, jobs of this session still running."""
    with st.sidebar:
        info = state.model_info()
        if info:
            st.caption(f":material/memory: {info['name']} on {info['device']} ({info['dtype']})")
        else:
            st.caption(":material/memory: no model loaded")
        running = state.backend().queue.active(state.session().token)
        if running:
            st.caption(f":material/pending: {len(running)} job(s) running or queued")


# ----------------------------------------------------------------------------- what the next run costs


def _token_sizes(corpus: str) -> list[int]:
    """Token counts of the corpus's documents under the loaded model's tokenizer (the workbench caches them)."""
    from app.engine import loaded_entry

    wb = loaded_entry(state.backend(), state.loaded_key()).wb
    return [int(t.numel()) for t in wb.corpus(corpus).tokens]


def _spec():
    from app.engine import loaded_entry
    from qroar.preflight import spec_of_loaded

    key = state.loaded_key()
    wb = loaded_entry(state.backend(), key).wb
    return spec_of_loaded(key.name, wb.model.config.to_dict(), wb.tokenizer, wb.model)


def _device() -> str:
    from app.engine import loaded_entry

    return loaded_entry(state.backend(), state.loaded_key()).wb.device.type


def cost(forwards_of, passes_text: str, at_most: bool = False) -> None:
    """A caption saying what the next run costs before it runs: `forwards_of(sizes_of, spec)` returns
    ([(windows, length)] in all, what they are); the time from this model's measured pace when a run has
    measured it, else estimated from this CPU's matmul speed."""
    from qroar.preflight import cost_text

    try:
        spec = _spec()
        forwards, what = forwards_of(_token_sizes, spec)
        pace = state.backend().paces.get(state.loaded_key())
        st.caption(f":material/schedule: {passes_text}: {what}; "
                   + cost_text(spec, forwards, 1, _device(), pace, at_most) + ".")
    except QroarError as e:  # a setting that cannot run says so where it is edited
        st.caption(f":material/schedule: cost not known: {e}")
