"""Demo LM: the claim. The seed's claim measured on demo-lm and its dense twin (models/demo/claims.json,
written by `python -m bench.demo_claims`): the table with each row's command, the perplexity-vs-density
curve, the decode benchmark and the verdict. Reads a file; runs no model."""
import streamlit as st

from pages._shared import _legacy_router, explain, navigation, show
from sam_viz import claims as cl
from sam_viz.figures.claims import perplexity_curve
from sam_viz.text import escape_markdown

if _legacy_router():                       # a deep link on a fresh server: the app's navigation first
    navigation().run()
    st.stop()

st.header("Demo LM: the claim")
explain("""
Sparse activation models promise **comparable accuracy at under half the compute**, and dynamic
sparsity (choosing neurons per token) beating static pruning. Here it is measured on `demo-lm`,
trained with top-k MLP sparsity at density 0.1, and its dense twin `demo-lm-dense`, on the held-out
split of the Python documentation that no training step saw.

- **Perplexity**: exp of the mean next-token loss; lower is better. Each row's command reproduces it.
- **MLP neurons computed**: share of MLP neurons evaluated per token, over all layers.
- **MLP FLOPs / weight bytes per token**: what a batch-1 decoder pays. `topk` is the oracle: it must
  compute every neuron's h to rank them, so it saves only the down projection of the dropped neurons.
  `predictor` and `static` choose before reading any MLP weight, so they read about density x the weights.
- **Post-hoc**: the dense twin run sparsely only at inference, never trained for it.
- **Decode speed**: greedy tokens/s of demo-lm through the compiled `cpu` kernel, against the Amdahl
  ideal 1 / (f_other + f_mlp x density): only the MLPs shrink.
""")

try:
    claims = cl.read_claims()
except ValueError as exc:
    st.error(f"The shipped claims file cannot be read: {escape_markdown(str(exc))}.")
    st.stop()
if claims is None:
    st.info("No claims have been measured yet: run `python -m bench.demo_claims`.")
    st.stop()
for model in cl.stale(claims):
    st.warning(f"The shipped weights of {model} are not the ones these numbers were measured on; "
               "run `python -m bench.demo_claims` again.")
if claims["dropped"]:
    st.caption(f"{claims['dropped']} rows of the claims file are not shown: not well formed, or past the "
               f"limit of {cl.MAX_ROWS}.")

st.subheader("Verdict")
st.markdown("\n".join(f"- {line}" for line in cl.summary(claims)))
with st.expander("The verdict in full"):
    st.markdown(escape_markdown(cl.verdict(claims)["sentence"]))

st.subheader("Held-out perplexity")
scope = (f"the first {claims['max_tokens']:,} held-out tokens" if claims["max_tokens"]
         else "the whole held-out split")
st.caption(f"Every row scores {scope} (`models/demo/heldout.txt`); density is the share of MLP neurons "
           f"asked for, trained density {claims['trained_density']:g}.")
st.dataframe(cl.table_rows(claims), hide_index=True, column_order=cl.PAGE_COLUMNS,
             column_config={"part": st.column_config.TextColumn("part", width="medium"),
                            "command": st.column_config.TextColumn("command", width="medium")})
show(perplexity_curve(cl.scoped(claims, "mlp")), key="claims_curve")   # the MLP-density curve

st.subheader("Decode speed")
decode = cl.decode_table(claims)
if decode:
    st.dataframe(decode, hide_index=True)
    runs = {r["command"]: [x["policy"] for x in claims["decode"] if x["command"] == r["command"]]
            for r in claims["decode"]}
    if len(runs) > 1:
        st.caption("The rows come from separate runs (" + "; ".join(f"{', '.join(ps)}: `{c.replace('`', chr(39))}`"
                   for c, ps in runs.items()) + "), each with its own dense baseline on the machine's load at "
                   "the time: compare each row's speedup, not tokens/s across rows.")
    missing = [p for p in cl.SAVES_WORK if p not in {r["policy"] for r in decode}]
    if missing:
        st.caption(f"Not measured: {', '.join(missing)} (no decode row in the claims file); run "
                   f"`python -m bench.demo_claims --add-decode {' '.join(missing)}`.")
    st.caption("Batch 1, greedy, KV cache, dense and sparse runs interleaved; f_mlp is the MLPs' measured share "
               "of a dense decode step. Reproduce: `python -m bench.demo_claims`.")
else:
    st.caption("The claims file holds no decode benchmark (it was measured with --no-decode).")

with st.expander("Commands, one per row"):
    st.code("\n".join(r["command"] for r in claims["rows"] if r["command"]), language="bash")
