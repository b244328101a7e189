"""Setup: the model, the position interpolation, the quantizer, the corpus and the context lengths."""

import streamlit as st

from app import state, widgets as w
from app.charts import length_label
from app.engine import SPLITS, default_group_size, group_size_options, gpu_table, load_job, queue_note
from qroar.errors import QroarError
from qroar.models import PRESETS
from qroar.quant import METHODS, NEEDS_CALIBRATION, SCOPES, is_row_scale_equivariant
from qroar.rope import ROPE_TYPES

ROPE_HELP = {
    "default": "no interpolation: the model as trained",
    "linear": "positions divided by the factor (all frequencies alike)",
    "dynamic": "NTK-aware: theta grows with the sequence length past the trained context",
    "yarn": "per-frequency ramp between interpolation and extrapolation, plus attention temperature",
    "llama3": "Llama 3.1 rule: low frequencies interpolated, high ones kept, smooth between",
    "longrope": "per-pair factors (a simple ramp here; pass searched ones from the CLI)",
}
SCOPE_HELP = {"linear": "every linear of the decoder layers", "attention": "q, k, v, o projections", "qk": "q and k projections only"}


def applied_pi(trained: int) -> str:
    """The position interpolation these settings apply, for the model card (beside the RoPE as trained)."""
    try:
        pi = state.recipe().pi
    except QroarError:
        return "an invalid setting (see section 2)"
    if pi.rope_type == "default":
        return "`default`: no interpolation"
    orig = pi.original_max_position_embeddings or trained
    return f"`{pi.rope_type}` x{pi.factor:g} · context {orig:,} stretched to about {length_label(int(orig * pi.factor))} tokens"

st.title("Setup")
st.caption("Choose a model, how its RoPE is stretched past the trained context, how its weights are quantized, "
           "and what text to measure on. Settings are kept for this session (the `?s=` part of the address).")

# ----------------------------------------------------------------------------- model
st.subheader("1 · Model")
c1, c2, c3 = st.columns([3, 1, 1])
with c1:
    choices = [*PRESETS, state.OTHER_MODEL]
    w.select("Model", "model.choice", choices, format_func=lambda c: c if c == state.OTHER_MODEL else f"{c} (preset)")
    if state.get("model.choice") == state.OTHER_MODEL:
        w.text("Local folder or Hugging Face id", "model.custom", placeholder="/path/to/model or org/name")
    else:
        st.caption(PRESETS.get(state.get("model.choice"), ""))
with c2:
    w.select("Device", "model.device", ["auto", "cuda", "cpu"], help="auto: the GPU when there is one")
with c3:
    w.select("Dtype", "model.dtype", ["auto", "bf16", "fp16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU")
t1, t2 = st.columns(2)
with t1:
    if w.toggle("Allow pickle weights (.bin / .pt)", "model.allow_pickle"):
        st.warning("Pickle weights can run arbitrary code when loaded: allow them only for sources you trust.",
                   icon=":material/warning:")
with t2:
    if w.toggle("Trust remote code", "model.trust_remote_code"):
        st.warning("The model repository's own Python code will run in this server: only for sources you trust.",
                   icon=":material/warning:")

gpus = gpu_table()
if len(gpus):
    st.caption(f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} on this host:")
    st.dataframe(gpus, hide_index=True)
if len(gpus) >= 2:
    g1, g2 = st.columns([2, 1])
    with g1:
        split = w.select("Split the model over the GPUs", "model.device_map", list(SPLITS), format_func=SPLITS.get,
                         help="accelerate's device_map: each GPU holds some layers; for models larger than one GPU")
    with g2:
        w.text("Memory per GPU (optional)", "model.max_memory", placeholder="0=70GiB,1=70GiB", disabled=not split,
               help="accelerate's max_memory: the most each GPU may hold of the weights")
    st.caption(queue_note(len(gpus), state.get("model.device_map")))

key = state.model_key()
bad_split = None
try:
    key.placement()
except QroarError as e:
    bad_split = str(e)
    st.error(bad_split, icon=":material/error:")
loaded = state.loaded_key()
busy = w.is_running("load")
label = "Model loaded" if loaded == key else "Load model"
if st.button(label, type="primary", icon=":material/download:",
             disabled=busy or not key.name or loaded == key or bad_split is not None):
    state.submit("load", load_job(state.backend(), key, state.session()), label=f"Loading {key.name}",
                 meta=key.to_dict())
    st.rerun()
w.job_status("load")
info = state.model_info()
if info:
    if loaded != key:
        st.info(f"Loaded: **{loaded.name}** ({loaded.device}, {loaded.dtype}). The settings above differ: "
                "press Load model to switch.", icon=":material/info:")
    w.model_card(info, applied=applied_pi(int(info["trained_context"])))

# ----------------------------------------------------------------------------- position interpolation
st.subheader("2 · Position interpolation")
trained = state.trained_context()
p1, p2, p3 = st.columns([2, 1, 1])
with p1:
    rope_type = w.select("RoPE scaling type", "pi.rope_type", ROPE_TYPES)
    st.caption(ROPE_HELP.get(rope_type, ""))
with p2:
    w.number("Factor", "pi.factor", min_value=1.0, max_value=128.0, step=1.0, format="%g",
             disabled=rope_type == "default", help="target context = factor x original context")
with p3:
    w.number("Original context (0 = trained)", "pi.original", min_value=0, step=256,
             disabled=rope_type == "default",
             help=f"the context the model was trained at; 0 uses the model's own ({trained or 'load a model'})")
if rope_type in ("yarn", "llama3"):
    with st.expander(f"{rope_type} parameters"):
        e1, e2 = st.columns(2)
        if rope_type == "yarn":
            with e1:
                w.number("beta_fast", "pi.beta_fast", min_value=0.0, step=1.0, format="%g",
                         help="rotations above which a pair is extrapolated (kept as trained)")
            with e2:
                w.number("beta_slow", "pi.beta_slow", min_value=0.0, step=0.5, format="%g",
                         help="rotations below which a pair is fully interpolated")
        else:
            with e1:
                w.number("low_freq_factor", "pi.low_freq_factor", min_value=0.1, step=0.5, format="%g")
            with e2:
                w.number("high_freq_factor", "pi.high_freq_factor", min_value=0.1, step=0.5, format="%g")
try:
    pi = state.recipe().pi
    if rope_type != "default":
        orig = pi.original_max_position_embeddings or trained
        if orig:
            st.caption(f"{pi.label()}: trained context {length_label(orig)} stretched to about "
                       f"{length_label(int(orig * pi.factor))} tokens.")
except QroarError as e:
    st.error(str(e), icon=":material/error:")

# ----------------------------------------------------------------------------- quantizer
st.subheader("3 · Weight quantizer")
q1, q2, q3, q4 = st.columns([1.2, 1.5, 1.2, 1.4])
with q1:
    method = w.select("Method", "quant.method", METHODS, help="none keeps full precision")
scope = state.get("quant.scope")
widths = (info or {}).get("widths", {}).get(scope) if info else None
sizes = group_size_options(widths)
with q2:
    w.slider("Bits", "quant.bits", min_value=2, max_value=8, disabled=method == "none")
with q3:
    w.select("Group size", "quant.group_size", sizes, fallback=default_group_size(sizes),
             format_func=lambda g: {0: "per channel", -2: "per tensor"}.get(g, str(g)), disabled=method == "none",
             help="input channels sharing one scale; only sizes dividing every layer width of the loaded model are listed")
with q4:
    scope = w.select("Scope", "quant.scope", SCOPES, disabled=method == "none")
    st.caption(SCOPE_HELP[scope])
w.toggle("Symmetric grid", "quant.symmetric", disabled=method == "none")
if method in NEEDS_CALIBRATION:
    with st.expander("Calibration (GPTQ / AWQ)"):
        k1, k2 = st.columns(2)
        with k1:
            w.number("Calibration windows", "quant.n_samples", min_value=1, max_value=1024, step=8)
        with k2:
            w.number("Window length (0 = trained context)", "quant.seq_len", min_value=0, step=256)
        st.caption("Calibration text: the embedded dev documents, under the PI setting above.")
try:
    qc = state.recipe().quant
    if method != "none" and is_row_scale_equivariant(qc):
        st.caption(f"{qc.describe()} is row-scale-equivariant: symmetric per-band rescaling before it changes only rounding.")
except QroarError as e:
    st.error(str(e), icon=":material/error:")

# ----------------------------------------------------------------------------- corpus and lengths
st.subheader("4 · Corpus and context lengths")
d1, d2 = st.columns([1, 2])
with d1:
    source = w.radio("Corpus", "corpus.source", list(state.CORPORA), format_func=state.CORPORA.get)
with d2:
    if source == "path":
        w.text("Text file or folder of .txt / .md files", "corpus.path", placeholder="/path/to/texts")
    elif source == "hf":
        w.text("Dataset spec", "corpus.hf", placeholder="hf:name:config:split:field",
               help="needs the `datasets` package and access to the dataset (or its local cache)")
    else:
        st.caption("Long public-domain documents shipped with qroar (Austen, State of the Union messages, "
                   "mathematics and proofs). Dev documents are for tuning, held-out ones for reporting.")
    if not trained:  # the lengths offered are multiples of the trained context: only known once a model is loaded
        st.caption("Context lengths: load a model first; they are offered as multiples of its trained context "
                   "(1x, 2x, 4x and 8x by default).")
    else:
        options = state.length_options(trained)
        chosen = w.multiselect("Context lengths (tokens)", "eval.lengths", options, value=state.lengths(),
                               format_func=lambda n: f"{length_label(n)} ({n / trained:g}x)",
                               help="defaults: 1x, 2x, 4x and 8x the trained context")
        if not chosen:
            st.warning("Choose at least one context length.", icon=":material/warning:")
    with st.expander("Evaluation options"):
        o1, o2 = st.columns(2)
        with o1:
            w.number("Windows per document and length (0 = all)", "eval.max_windows", min_value=0, step=1,
                     help="a cap keeps long documents quick to evaluate")
        with o2:
            w.number("Stride (0 = non-overlapping windows)", "eval.stride", min_value=0, step=64)

w.link("perplexity", "Next: measure perplexity", ":material/arrow_forward:")
