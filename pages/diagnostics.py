"""Diagnostics: per-band pressure, tail inflation, quantization error and logit noise under the chosen PI."""

import streamlit as st

from app import diag_charts as dc, run_views, state, widgets as w
from app.charts import length_label
from app.engine import diagnostics_job
from app.jobs import DONE
from qroar.bands import BandConfig
from qroar.diagnostics import DiagConfig
from qroar.errors import QroarError

# This page's settings (kept in the session record like every other setting).
for _name, _value in {"diag.n_bands": 8, "diag.align": "log", "diag.capture_x": 2.0, "diag.n_docs": 4,
                      "diag.eps": 1e-3, "diag.noise_pairs": 256, "diag.skip_first": False,
                      "diag.noise_mode": "isolated", "diag.noise_layer": "all"}.items():
    state.DEFAULTS.setdefault(_name, _value)
CAPTURE_MULTIPLES = (1.5, 2.0, 4.0, 8.0)


st.title("Diagnostics")
st.caption("Where position interpolation and quantization meet, band by band. Bands are log-spaced groups of "
           "RoPE pairs (b0 = highest frequency). Full precision and quantized are measured on the same windows.")

info = w.need_model()
trained = int(info["trained_context"])
st.markdown(w.settings_summary())

with st.expander("Diagnostics settings", expanded=state.job("diagnostics") is None, icon=":material/tune:"):
    c1, c2, c3 = st.columns(3)
    with c1:
        w.slider("Bands", "diag.n_bands", min_value=4, max_value=min(16, info["rotary_dim"] // 2), step=1,
                 help="Log-spaced bands over the RoPE pairs (4 to 16).")
        w.radio("Band edges", "diag.align", ["log", "yarn"], horizontal=True,
                help="yarn: edges also on YaRN's ramp boundaries, so no band mixes kept and interpolated pairs.")
    with c2:
        w.select("Capture length (x trained context)", "diag.capture_x", CAPTURE_MULTIPLES,
                 format_func=lambda m: f"{m:g}x = {length_label(int(m * trained))} tokens",
                 help="One window of this many tokens per document: positions below the trained context are "
                      "'short', the rest 'long'.")
        w.number("Documents", "diag.n_docs", min_value=1, max_value=64, step=1)
    with c3:
        w.select("Tail quantile eps", "diag.eps", [1e-2, 1e-3, 1e-4], format_func=lambda e: f"{e:g} (Q{1 - e:g})")
        w.number("Pairs per distance bucket", "diag.noise_pairs", min_value=8, max_value=4096, step=8)
        w.toggle("Leave out the first token (attention sink)", "diag.skip_first")

busy = w.is_running("diagnostics")
if st.button("Run diagnostics", type="primary", icon=":material/play_arrow:", disabled=busy):
    try:
        cfg = DiagConfig(bands=BandConfig(int(state.get("diag.n_bands")), state.get("diag.align")),
                         capture_length=int(float(state.get("diag.capture_x")) * trained),
                         n_docs=int(state.get("diag.n_docs")), eps=float(state.get("diag.eps")),
                         noise_pairs=int(state.get("diag.noise_pairs")), skip_first=int(bool(state.get("diag.skip_first"))))
        recipe, corpus = state.recipe(), state.corpus_spec()
    except QroarError as e:
        st.error(str(e), icon=":material/error:")
    else:
        fn = diagnostics_job(state.backend(), state.loaded_key(), recipe, corpus, cfg)
        state.submit("diagnostics", fn, label=f"Diagnostics at {length_label(cfg.capture_length)} tokens",
                     meta={"pi": recipe.pi.label(), "quant": recipe.quant.describe(), "corpus": corpus})
        st.rerun()

job = w.job_status("diagnostics")
if job is None or job.status != DONE:
    if job is None:
        st.info("Press **Run diagnostics**. Bands and Interpolation Pressure are analytic; tail ratios and logit "
                "noise need two forwards (full precision, quantized) per document.", icon=":material/info:")
    st.stop()

res = job.result
t, s = res.tables, res.settings
st.caption(f"PI {job.meta.get('pi')} · {job.meta.get('quant')} · {len(s['docs'])} document(s) of "
           f"{s['capture_length']:,} tokens · trained context {s['trained_context']:,} · {s['seconds']:.1f} s"
           + ("" if s["quantized"] else " · no quantizer: quantized = full precision"))

st.subheader("Bands and frequencies")
st.plotly_chart(dc.bands_figure(t["pairs"], s["trained_context"]), width="stretch")
st.caption("Blue: each pair's wavelength as trained; orange: after PI; dashed: the trained context. What to look for: "
           "pairs whose blue wavelength lies above the dashed line never completed a turn in training; s_j (dotted, "
           "right axis) is how much PI slows each pair down, 1 where a pair is kept as trained.")

st.subheader("Interpolation Pressure")
st.plotly_chart(dc.ip_heatmap(t["ip"], s["trained_context"]), width="stretch")
st.caption("IP_j(D) = omega_j D / s_j^2: how fast the phase at distance D moves when s_j changes. What to look for: "
           "high-frequency bands under high pressure tolerate only small scale changes (tight windows).")

for kind, title, what in (
    ("W", "Tail Inflation Ratio of the projections (TIR_W)",
     "Q(1-eps) of |W_b h| at positions beyond the trained context over the same quantile inside it. What to look "
     "for: red cells (> 1, without a dot) are bands whose outputs grow at long context; orange or purple cells in "
     "the difference panel (quantized - full precision, same tokens) are where the quantizer changes that growth."),
    ("A", "Tail Inflation Ratio per axis after RoPE (TIR_A)",
     "The same ratio on the rotated q and k components, what an axis-aligned grid of rotated vectors sees. What to "
     "look for: bands where TIR_A exceeds TIR_W: rotation spreads the tail over both axes of a pair."),
):
    if (t["tir"].kind == kind).any():
        st.subheader(title)
        st.plotly_chart(dc.tir_heatmaps(t["tir"], kind), width="stretch")
        st.caption(what)
        st.caption(dc.tir_sampling_note(t["tir"], kind, s["diag"].get("eps")))

st.subheader("Per-band quantization error")
st.plotly_chart(dc.quant_error_heatmap(t["quant_error"]), width="stretch")
st.caption("||Q(W_b) - W_b||_F / ||W_b||_F over the rows of each band in every head. What to look for: bands whose "
           "weights the quantizer hits harder than the rest.")

st.subheader("Position-dependent logit noise")
c1, c2 = st.columns(2)
with c1:
    mode = w.radio("Inputs to the quantized layer", "diag.noise_mode", ["isolated", "accumulated"], horizontal=True,
                   help="isolated: the full-precision model's inputs (this layer's weight error only); "
                        "accumulated: the quantized model's own inputs (every earlier layer's error too).")
with c2:
    layers = ["all"] + [str(i) for i in s["noise_layers"]]
    layer = w.select("Layer", "diag.noise_layer", layers, format_func=lambda v: "all sampled layers (pooled)" if v == "all" else f"layer {v}")
noise = t["logit_noise_pooled"] if layer == "all" else t["logit_noise"][t["logit_noise"].layer == int(layer)]
st.plotly_chart(dc.noise_heatmap(noise, mode), width="stretch")
st.plotly_chart(dc.noise_lines(noise, mode), width="stretch")
st.caption("Both charts: the RMS of (quantized - full precision) band logits q_b . k_b (times the attention's "
           "scaling) over the sampled query-key pairs of each distance bucket, in percent of the RMS full-precision "
           f"band logit; {int(noise.n_pairs.iloc[0]):,} samples per bucket (sampled pairs x documents"
           + (" x sampled layers, pooled)" if layer == "all" else f", layer {layer})") + ", every query head. "
           "What to look for: error that grows with distance in the low-frequency bands (the higher b) is the PI x "
           "quantization coupling Q-ROAR targets; flat lines mean the error does not depend on position.")

st.download_button("Download all tables (JSON)", res.to_json(), file_name="qroar_diagnostics.json",
                   mime="application/json", icon=":material/download:")

run_views.diagnostics_overlay(mode)  # other diagnostics runs of this session, side by side
