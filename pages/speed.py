"""Speed: what the sparse pass costs in time on this machine, against what reading fewer weights
could save at best; the kernel and decode benchmarks as charts."""
import json
import threading

import streamlit as st

from pages._shared import cost_delta, explain, page_context, progress_bar, show
from sam_viz import InputError, speed
from sam_viz.figures import speed as speed_figures
from sam_viz.benchmarks import decode, kernels

ctx = page_context()
COUNTED = ("The bytes and FLOPs are per token, as a batch-1 decoder pays them: topk and threshold must still "
           "read weights to choose." if ctx.analysis.kind == "causal-lm" else
           "The bytes and FLOPs are per token, counted as if each token were computed alone: this encoder runs "
           "all its tokens in one pass, which reads the union of the rows they select (at most every weight "
           "once). topk and threshold must still read weights to choose.")
a = ctx.analysis
st.header("Speed")
explain(f"""
A batch-1 decoder is limited by memory traffic: each new token reads every weight once. A sparse
MLP reads only the rows of the neurons it computes, so its **floor** is the time to read those
rows once at this machine's read bandwidth.

- **This run**: the prompt's forward time, dense and sparse, with the sidebar's policy, density
  and kernel. Two untimed rounds first (the first sparse pass lays out the kernel's weights and
  is several times slower), then rounds of one dense and one sparse pass side by side: the times
  are medians, the speedup is the median of the per-round ratios, with their range. Only the `cpu`
  kernel reads fewer weights; `reference` computes every neuron and masks, so it is slower than
  dense by design. {COUNTED}
- **Kernel benchmark**: one MLP of TinyLlama's shape, batch 1: dense `F.linear`, the `cpu` kernel
  and the floor (a loop that only reads the same rows). The ideal speedup is 1/density, counted
  from torch's dense MLP; where that reads its weights slower than the floor loop (bf16 especially),
  a measured speedup can pass 1/density (see below the charts).
- **Decode benchmark**: greedy tokens/s of a random 4-layer TinyLlama-shaped model with the
  `static` policy through the real sparse wrappers. Only the MLPs shrink, so the ideal is
  1 / (f_other + f_mlp x density), where f_mlp is the MLPs' share of a dense step (Amdahl). It is
  counted from torch's dense MLP too, so the share of it reached can pass 100%.
""")


@st.cache_resource(show_spinner=False)
def _bench_results() -> tuple[dict, threading.Lock]:
    """The last benchmark rows computed or loaded in this server process, by benchmark."""
    return {}, threading.Lock()


def _timing() -> dict:
    """The forward timing of this spec, measured once per session (again on request)."""
    held = st.session_state.get("_speed_timing")
    if held is None or held[0] != ctx.spec or st.session_state.get("_speed_again"):
        with st.spinner(f"Timing dense and sparse forward passes of the prompt ({speed.WARMUP_ROUNDS} warm-up "
                        f"rounds, then {speed.ROUNDS})..."):
            held = (ctx.spec, speed.time_forward(ctx.model(), ctx.spec))
        st.session_state["_speed_timing"] = held
    return held[1]


st.subheader("This run")
with st.spinner("Measuring this machine's read bandwidth (once)..."):
    summary = speed.cost_summary(a, speed.read_bandwidth_gb_s())
timing = None
if ctx.run_id:
    st.info("This is a saved run: timing needs the model, so only bytes and FLOPs are shown. Choose "
            "**Analyse live** above to time it.")
else:
    timing = _timing()
    m1, m2, m3 = st.columns(3)
    m1.metric(f"Dense forward ({timing['tokens']} tokens)", f"{timing['dense_ms']:.1f} ms")
    moved = speed.time_change(timing)
    m2.metric(f"Sparse forward ({ctx.spec.kernel} kernel)", f"{timing['sparse_ms']:.1f} ms",
              f"{speed.speedup_text(timing)} vs dense", delta_color={1: "red", -1: "green"}.get(moved, "off"),
              delta_arrow={1: "up", -1: "down"}.get(moved, "off"),
              help="Measured: the median of the per-round ratios dense time / sparse time (above 1x: faster).")
    m3.button("Time again", key="_speed_again")
if summary:
    moved = None if timing is None else speed.time_change(timing)
    k1, k2, k3 = st.columns(3)
    k1.metric("MLP weights read per token", f"{summary['sparse_bytes'] / 1e6:.2f} MB",
              **cost_delta(summary["sparse_bytes"], summary["dense_bytes"], f"{summary['dense_bytes'] / 1e6:.2f} MB",
                           "bytes", moved))
    k2.metric("MLP FLOPs per token", f"{summary['sparse_flops'] / 1e6:.2f} M",
              **cost_delta(summary["sparse_flops"], summary["dense_flops"], f"{summary['dense_flops'] / 1e6:.2f} M",
                           "FLOPs", moved))
    k3.metric("Floor per token (read once)", f"{summary['sparse_floor_ms']:.3f} ms",
              help=f"The time to read those bytes once at this machine's {summary['bandwidth_gb_s']:.1f} GB/s.",
              **cost_delta(summary["sparse_floor_ms"], summary["dense_floor_ms"],
                           f"{summary['dense_floor_ms']:.3f} ms", "floor", moved))
    st.caption("Bytes, FLOPs and floor are counted per token, not timed: what a batch-1 decoder would read and "
               "compute." + ("" if moved != 1 else f" This run was measured slower than dense ({timing['speedup']:.2f}x), "
                             "so their arrows are grey: reading fewer weights did not make it faster here."))
if timing is not None:
    show(speed_figures.forward_bars(timing, summary), key="forward_bars")

st.subheader("Benchmarks")
results, lock = _bench_results()
blocked = speed.benchmarks_unavailable()
if blocked:
    st.info(f"The benchmarks time the `cpu` kernel, which cannot run here: {blocked}. Saved results still load.")
b1, b2 = st.columns(2)
if b1.button("Run kernel benchmark (quick, ~1 min)", disabled=bool(blocked), help="TinyLlama's MLP shape, fp32 and "
             "bf16, 15 calls per point; it loads this machine, so other sessions slow down meanwhile."):
    with progress_bar("Kernel benchmark") as step:
        rows = kernels.run(**kernels.QUICK, progress=step)
    with lock:
        results["kernels"] = rows
if b2.button("Run decode benchmark (quick, ~1 min)", disabled=bool(blocked), help="Builds a random 4-layer "
             "TinyLlama-shaped model (about 0.8 GB) and decodes greedily, dense and sparse."):
    with progress_bar("Decode benchmark") as step:
        rows = decode.run(decode.QUICK, progress=step)
    with lock:
        results["decode"] = rows
upload = st.file_uploader("Or load results saved with `python -m sam_viz bench kernels|decode --json > file.json`",
                          type=["json"], key="bench_file")
if upload is not None:
    try:
        kind, rows = speed.parse_bench_json(upload.getvalue())
        with lock:
            results[kind] = rows
    except InputError as exc:
        st.error(str(exc))

with lock:
    kernel_rows, decode_rows = results.get("kernels", []), results.get("decode", [])
if not kernel_rows and not decode_rows:
    st.info("No benchmark has run in this server yet: run one above, or load a saved result.")
if kernel_rows:
    c1, c2 = st.columns(2)
    with c1:
        show(speed_figures.kernel_ms(kernel_rows), key="kernel_ms")
    with c2:
        show(speed_figures.kernel_speedup(kernel_rows), key="kernel_speedup")
    st.markdown(speed.beyond_ideal_note(kernel_rows))
if decode_rows:
    show(speed_figures.decode_tokens(decode_rows), key="decode_tokens")
    r = min(decode_rows, key=lambda row: abs(row["density"] - 0.1))
    st.caption(f"At density {r['density']:g}: {r['sparse_tok_s']:.1f} vs {r['dense_tok_s']:.1f} tokens/s, "
               f"{r['speedup']:.2f}x of an ideal {r['ideal_speedup']:.2f}x ({r['share_of_ideal']:.0%}). The ideal is "
               "counted from torch's dense MLP, so a share above 100% means that the dense MLP runs slower than "
               "reading its weights once (see the kernel benchmark's dense floor).")
gpu_info, gpu_rows = speed.saved_gpu_rows()
if gpu_rows:
    with st.expander("The `triton` kernel on a GPU (saved results)"):
        st.caption(f"Measured on {gpu_info.get('device', 'a lent GPU')} (torch {gpu_info.get('torch', '?')}, "
                   f"triton {gpu_info.get('triton', '?')}) by `bash bench/gpu_check.sh`: batch 1, calls replayed from "
                   "a CUDA graph (eager calls at batch 1 are launch-bound and slower than dense).")
        show(speed_figures.kernel_speedup(gpu_rows), key="gpu_speedup")
for kind, rows in (("kernels", kernel_rows), ("decode", decode_rows)):
    if rows:
        st.download_button(f"Download the {kind} results (JSON)", json.dumps(rows, indent=1),
                           file_name=f"bench-{kind}.json", mime="application/json", key=f"dl_{kind}")
