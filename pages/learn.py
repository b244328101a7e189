"""Learn: the four ideas behind Q-ROAR, computed live on small synthetic tensors with qroar's own functions."""

import numpy as np
import streamlit as st

from app import learn_charts as lc, state
from app.charts import length_label
from qroar import teach
from qroar.errors import QroarError
from qroar.quant import PER_TENSOR, QuantConfig
from qroar.rope import PIConfig, frequencies

PAIR_X0 = (0.9, 0.35)  # the pair's value at position 0 (any vector works; this one starts off the grid)
PI_TYPES = {"linear": "linear", "yarn": "YaRN", "dynamic": "dynamic NTK", "llama3": "llama3"}
GRIDS = {32: "groups of 32 inputs", 0: "one grid per row", PER_TENSOR: "one grid per tensor"}

st.title("Learn")
st.caption("What goes wrong when a RoPE model is stretched with position interpolation and then weight-quantized, "
           "in four small experiments. Every figure is computed now, with qroar's own RoPE, band and quantizer code.")

# ----------------------------------------------------------------------------- 1. anisotropy
st.subheader("1 · A rotating pair against an axis-aligned grid")
theta, head_dim, trained = next(iter(teach.CONFIGS.values()))
freqs = frequencies(teach.teaching_config(theta, head_dim, trained))
c1, c2, c3 = st.columns([2, 3, 1])
with c1:
    j = st.selectbox("RoPE pair j (Llama-2-7B-like head)", range(0, head_dim // 2, 4), index=3, key="learn.pair",
                     format_func=lambda j: f"j = {j}: one turn every {2 * np.pi / float(freqs.omega[j]):,.1f} tokens")
with c2:
    pos = st.slider("Position p", 0, 2000, 37, key="learn.pos")
with c3:
    bits = st.slider("Bits", 2, 6, 4, key="learn.bits")
omega_j = float(freqs.omega[j])
now = teach.pair_at_position(PAIR_X0, omega_j, pos, bits)
orbit = teach.error_vs_angle(PAIR_X0, bits, n=1441)
trail = teach.rotate_pair(PAIR_X0, omega_j * np.arange(max(pos - 6, 0), pos)).numpy()
st.plotly_chart(lc.anisotropy_figure(orbit, now.point, now.quantized, teach.grid_levels(now.radius, bits).tolist(),
                                     now.angle, trail), width="stretch", key="learn.fig1")
st.markdown(
    f"RoPE turns the pair (q_j, q_j+d/2) by p·θ_j = {now.angle:,.2f} rad as the position grows, but a quantizer rounds "
    "each axis on its own fixed grid, so the rounding error (red) depends on where the rotation has left the vector. "
    f"Over one turn it ranges from {orbit['error'].min():.3f} to {orbit['error'].max():.3f} at {bits} bits: "
    "the same vector is stored better at some positions than at others, and that is the anisotropy.")

# ----------------------------------------------------------------------------- 2. phases
st.subheader("2 · Phase aliasing and what interpolation does to each band")
configs = dict(teach.CONFIGS)
info = state.model_info()
if info:
    rp = info.get("rope_parameters") or {}
    configs[f"Loaded model: {info['name']}"] = (float(rp.get("rope_theta", 10000.0)),
                                                int(info.get("rotary_dim") or info["head_dim"]), int(info["trained_context"]))
p1, p2, p3, p4 = st.columns([3, 1.2, 1.4, 2])
with p1:
    cfg_name = st.selectbox("RoPE shape", list(configs), key="learn.config")
with p2:
    rope_type = st.selectbox("Interpolation", list(PI_TYPES), index=1, format_func=PI_TYPES.get, key="learn.rope_type")
with p3:
    factor = st.select_slider("Factor", [2, 4, 8, 16, 32], value=4, key="learn.factor")
theta2, head_dim2, trained2 = configs[cfg_name]
with p4:
    mult = st.select_slider("Distance D (x trained context)", [0.25, 0.5, 1, 2, 4, 8, 16, 32], value=4,
                            format_func=lambda m: f"{m:g}x = {length_label(max(int(m * trained2), 1))}", key="learn.dist")
distance = max(int(mult * trained2), 1)
pi = PIConfig(rope_type, float(factor))
try:
    table, freqs2, bands2 = teach.phase_demo(teach.teaching_config(theta2, head_dim2, trained2), pi, distance)
except QroarError as e:
    st.error(str(e), icon=":material/error:")
    st.stop()
st.plotly_chart(lc.phase_figure(table, trained2, distance, pi.label()), width="stretch", key="learn.fig2")
m1, m2, m3 = st.columns(3)
m1.metric("Pairs that wrap more than 100 times over D", int((table["turns_none"] > 100).sum()),
          help="high-frequency pairs: their phase at D is the same as at many other distances (aliasing)")
m2.metric("Pairs at unseen phases, no PI", int(table["unseen_none"].sum()),
          help="made less than one turn in training and go further at D: the model never saw these angles")
m3.metric(f"Pairs at unseen phases, {pi.label()}", int(table["unseen_pi"].sum()))
top = table.iloc[-1]
st.markdown(
    "High-frequency pairs (left) wrap around hundreds or thousands of times over D, so their phase alone cannot tell "
    f"distances apart (aliasing), while slow pairs (right) make under one turn in the trained {length_label(trained2)} "
    "tokens and, without PI, reach angles at D that the model never saw. "
    f"{pi.label()} divides each pair's phase by s_j to stay inside the trained range, which also shrinks the step between "
    f"neighbouring positions (slowest pair: {top['step_none']:.2e} → {top['step_pi']:.2e} rad), so positions crowd "
    "together and quantization noise blurs them sooner.")

# ----------------------------------------------------------------------------- 3. tails
st.subheader("3 · How the tails inflate from short to long context")
t1, t2, t3 = st.columns(3)
with t1:
    growth = st.slider("Outlier growth per trained context", 0.0, 4.0, 1.0, 0.25, key="learn.growth",
                       help="the outlier channel's amplitude is (1 + growth · p / L) at position p")
with t2:
    eps = st.select_slider("Tail fraction eps", [1e-4, 1e-3, 1e-2, 5e-2], value=1e-3, format_func=lambda e: f"{e:g}",
                           key="learn.eps")
with t3:
    tbits = st.slider("Grid bits", 2, 8, 4, key="learn.tbits")
data = teach.synthetic_tails(growth)
rep = teach.tail_report(data, eps, tbits)
st.plotly_chart(lc.tail_figure(data.y_short.numpy(), data.y_long.numpy(), rep, eps), width="stretch", key="learn.fig3")
k1, k2, k3 = st.columns(3)
k1.metric(f"Q{1 - eps:g} short", f"{rep['q_short']:.3g}")
k2.metric(f"Q{1 - eps:g} long", f"{rep['q_long']:.3g}")
k3.metric("Tail Inflation Ratio", f"{rep['tir']:.2f}", help="Q_{1-eps}(long) / Q_{1-eps}(short)")
st.markdown(
    "Here one activation channel carries a heavy-tailed outlier whose size grows with position, so the extreme values of "
    f"|W h| at long positions are {rep['tir']:.2f} times those at short ones (the Tail Inflation Ratio). "
    f"A min-max grid wide enough for the long tail has a step {rep['step_long'] / rep['step_short']:.2f} times coarser, "
    "and every token pays for it: the short tokens' rounding error grows from "
    f"{rep['rms_short']:.3g} to {rep['rms_long']:.3g}.")

# ----------------------------------------------------------------------------- 4. rescaling
st.subheader("4 · What per-band rescaling does to the logits")
head = teach.random_head()
r1, r2, r3, r4, r5 = st.columns([1, 2, 1.3, 1.6, 1])
with r1:
    band = st.selectbox("Band", range(head.bands.n_bands), index=1, key="learn.band")
with r2:
    g = st.select_slider("Scale g", [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0], value=2.0, key="learn.g")
with r3:
    mode = st.radio("Mode", ["symmetric", "shared"], key="learn.mode",
                    help="symmetric: W_Q·g, W_K/g · shared: W_Q·g, W_K·g")
with r4:
    grid = st.selectbox("RTN grid", list(GRIDS), format_func=GRIDS.get, key="learn.grid")
with r5:
    qbits = st.slider("RTN bits", 2, 8, 4, key="learn.qbits")
demo = teach.logit_demo(head, band, float(g), mode, QuantConfig(method="rtn", bits=qbits, group_size=grid))
st.plotly_chart(lc.logit_figure(demo.table(), band, mode), width="stretch", key="learn.fig4")
d_fp, d_q = demo.max_logit_change()
l1, l2 = st.columns(2)
l1.metric("Largest logit change from rescaling, full precision", f"{d_fp:.3g}")
l2.metric("Largest logit change from rescaling, quantized", f"{d_q:.3g}")
st.markdown(
    "Scaling a band's W_Q rows by g and its W_K rows by 1/g (symmetric) leaves every logit unchanged in exact arithmetic, "
    "and a row-wise min-max quantizer scales with the rows (Q(gW) = g·Q(W)), so the quantized logits change only by "
    "rounding, and not at all for g a power of two; only a per-tensor grid gives symmetric mode a real effect. "
    "Shared mode scales W_K by g as well, multiplying that band's contribution by g² (a per-band attention temperature): "
    "the effect Q-ROAR's search tunes.")
