"""Export: the scales file (preview, download, import) and a checkpoint with the scales folded in."""

import streamlit as st

from app import state, widgets as w
from app.engine import (MAX_SCALES_FILE_BYTES, checkpoint_job, import_scales, loaded_entry, scales_file_job,
                        verify_job)
from app.jobs import DONE
from qroar import recipe as recipe_mod
from qroar.errors import QroarError
from qroar.export import FORMATS

IMPORTED = "qroar.imported"  # st.session_state: (file id, message) of the last upload handled


def handle_upload(upload) -> None:
    """Validate an uploaded scales file and make it this session's settings; errors are shown, never raised."""
    if upload is None or st.session_state.get(IMPORTED, (None,))[0] == upload.file_id:
        return
    try:
        sf = import_scales(state.backend(), state.loaded_key(), upload.getvalue(), upload.name)
    except QroarError as e:
        st.session_state[IMPORTED] = (upload.file_id, None)
        st.error(f"{e}", icon=":material/error:")
        st.caption("Nothing was changed. Choose a scales file written by qroar (Export page or `qroar export`) "
                   "for the loaded model.")
        return
    before = (state.recipe().pi.label(), state.recipe().quant.describe())
    state.set_recipe(sf.recipe)
    state.put("export.scales_from", "tune")
    after = (sf.pi.label(), sf.quant.describe() if sf.quant is not None else "fp")
    msg = (f"Imported **{upload.name}**: {len(sf.scales)} {sf.band_cfg.align} bands, {sf.scale_cfg.mode} mode, "
           f"{sf.scale_cfg.order} quantization, scales " + ", ".join(f"{g:.3f}" for g in sf.scales) + ".")
    if after != before:
        msg += f" PI and quantizer set to the file's: {after[0]}, {after[1]} (were {before[0]}, {before[1]})."
    st.session_state[IMPORTED] = (upload.file_id, msg)
    st.rerun()


st.title("Export")
st.caption("Save the current scales with everything needed to reproduce them, load scales saved before, or write a "
           "Hugging Face checkpoint with the scales folded into the weights (nothing extra at inference).")

info = w.need_model()
st.markdown(w.settings_summary())

sources = state.scale_sources()
if not sources:
    st.info("No scales yet: move a scale on Tune or run a Search (or import a scales file below).", icon=":material/info:")
    source = None
else:
    if len(sources) > 1:
        names = [s["name"] for s in sources]
        chosen = state.chosen_scales()["name"]
        pick = st.radio("Scales to export", names, index=names.index(chosen), horizontal=True,
                        format_func=lambda n: next(s["label"] for s in sources if s["name"] == n)
                        + (" · latest" if n == names[0] else ""),
                        help="Export and Report use the latest scales you produced unless you pick the other here.")
        if pick != chosen:
            state.put("export.scales_from", pick)
            st.rerun()
    source = state.chosen_scales()
try:
    recipe = source["recipe"] if source is not None else state.recipe()
    geo = loaded_entry(state.backend(), state.loaded_key()).wb.geometry
    recipe = recipe.with_scales(recipe.scales or [1.0] * recipe_mod.band_edges(recipe, geo).n_bands)
except QroarError as e:
    st.error(str(e), icon=":material/error:")
    st.stop()
result = source["result"] if source is not None else None

# ----------------------------------------------------------------------------- scales file
st.subheader("1 · Scales file")
st.caption(f"From **{source['label'] if source else 'no scales (all 1)'}** · {len(recipe.scales)} {recipe.bands.align} "
           f"bands · {recipe.scale.mode} mode · {recipe.scale.order} quantization · scales "
           + ", ".join(f"b{b}={g:.3f}" for b, g in enumerate(recipe.scales))
           + (" · with the search's objective and held-out results" if result is not None else ""))
sig = repr((state.loaded_key(), recipe, id(result)))
last = state.job("scales_file")
if last is None or last.meta.get("sig") != sig:
    if last is not None and not last.is_finished:
        state.backend().queue.cancel(last.id)
    state.submit("scales_file", scales_file_job(state.backend(), state.loaded_key(), recipe, result),
                 label="Preparing the scales file", meta={"sig": sig})
w.job_status("scales_file")
job = state.result("scales_file")
if job is not None:
    out = job.result
    if job is not state.job("scales_file") or job.meta.get("sig") != sig:
        st.caption(":material/history: Preview of the previous settings while the new one is prepared.")
    st.download_button("Download scales file", out.text, file_name=out.file_name, mime="application/json",
                       icon=":material/download:", type="primary", disabled=job.meta.get("sig") != sig)
    with st.container(height=420):  # the file is long (results per length); keep the page compact
        st.json(out.payload, expanded=2)
    if out.payload.get("note"):
        st.caption(f":material/info: {out.payload['note']}")

# ----------------------------------------------------------------------------- import
st.subheader("2 · Import a scales file")
done = st.session_state.get(IMPORTED)
if done is not None and done[1]:
    st.success(done[1], icon=":material/check_circle:")
upload = st.file_uploader("Scales file (.json)", type=["json"], max_upload_size=max(1, MAX_SCALES_FILE_BYTES >> 20),
                          help="Read as JSON and validated against the loaded model; nothing in it is executed.")
handle_upload(upload)
st.caption("Its PI, quantizer, bands, mode, order and scales become this session's settings (Setup, Tune and Search "
           "show them).")

# ----------------------------------------------------------------------------- folded checkpoint
st.subheader("3 · Folded checkpoint")
c1, c2 = st.columns([3, 2])
with c1:
    w.text("Folder to write", "export.folder", placeholder="exports/my-model-qroar",
           help="Created if missing; a folder holding anything but a qroar export is refused.")
    w.toggle("Overwrite an earlier export there", "export.overwrite",
             help="Without it an earlier export in the folder is left as it is. Files of your own in it are kept.")
with c2:
    w.radio("Format", "export.format", [k for k, f in FORMATS.items() if f.folder], horizontal=True,
            format_func=lambda k: FORMATS[k].label,
            help="hf: full precision, quantize it with your own tool afterwards. fake-quant: the exact weights "
                 "Q-ROAR evaluated, stored in the model's dtype. compressed-tensors / gguf: packed int4/int8 files that "
                 "stock runtimes load, with the PI settings inside; they need the format's own quantizer on Setup "
                 "(ct, or rtn with a symmetric grid; gguf-q4_0 / gguf-q8_0 / ...), so the perplexities of Tune and "
                 "Search are the file's.")
busy = w.is_running("checkpoint")
if st.button("Export folded checkpoint", icon=":material/save:", disabled=busy):
    fn = checkpoint_job(state.backend(), state.loaded_key(), recipe, state.get("export.folder"),
                        state.get("export.format"), result, overwrite=bool(state.get("export.overwrite")))
    state.submit("checkpoint", fn, label="Writing the checkpoint", meta={"folder": state.get("export.folder")})
    st.rerun()
ck = w.job_status("checkpoint")
if ck is not None and ck.status == DONE:
    r = ck.result
    st.success(f"Written to `{r.path}` ({r.bytes / 1e6:.1f} MB, {'fake-quantized' if r.quantized else 'full precision'}, "
               f"{r.seconds:.1f} s): " + ", ".join(r.files), icon=":material/check_circle:")
    if r.fp_bytes:
        st.caption(f"Size: {r.bytes / 1e6:.1f} MB against {r.fp_bytes / 1e6:.1f} MB of full-precision weights "
                   f"({r.bytes / r.fp_bytes:.0%}).")
    st.caption("Load it with plain transformers; qroar is not needed:")
    st.code(r.snippet, language="python")
    if r.fmt in ("compressed-tensors", "gguf"):
        if st.button("Verify: reload with stock libraries and compare perplexity", icon=":material/fact_check:",
                     disabled=w.is_running("verify"),
                     help="A separate process loads the file with transformers (+ compressed-tensors / gguf), not "
                          "qroar's loader, and measures perplexity on one window; qroar measures the same window."):
            state.submit("verify", verify_job(state.backend(), state.loaded_key(), recipe, r.path),
                         label="Verifying the export", meta={"path": r.path})
            st.rerun()
vj = w.job_status("verify")
if vj is not None and vj.status == DONE:
    v = vj.result
    c1, c2, c3 = st.columns(3)
    c1.metric("Dashboard (qroar, in memory)", f"{v.qroar_ppl:.4f}")
    c2.metric("Reloaded file (stock libraries)", f"{v.stock_ppl:.4f}")
    c3.metric("Relative difference", f"{v.rel_diff:.1e}")
    rp = v.rope_parameters
    st.caption(f"One window of {v.tokens} tokens · {v.loader} · rope after reload: {rp.get('rope_type')}"
               + (f" x{rp.get('factor')} (original {rp.get('original_max_position_embeddings')})"
                  if rp.get("rope_type") not in (None, "default") else ""))
    if v.note:
        st.caption(f":material/info: {v.note}")
