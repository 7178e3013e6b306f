"""Firing map: which neurons each token used, layer by layer. A click on a heatmap cell opens that
neuron in the Corpus page's neuron view when a profile of this model exists."""
from functools import partial

import streamlit as st

from pages._shared import page_context, explain, layer_picker, page_link, show, token_picker
from sam_viz.figures import firing
from sam_viz.profile.view import profile_of_model, strongest_unit
from sam_viz.text import escape_markdown

ctx = page_context()
a = ctx.analysis
st.header("Firing map")
st.caption(f"{escape_markdown(a.spec.model)} · {a.spec.policy} at density {a.spec.density:g} · "
           f"{len(a.tokens)} tokens · {a.n_layers} layers × {a.n_neurons} neurons")
explain(f"""
Every token passes through each layer's MLP, a block of **{a.n_neurons} neurons**. A dense model computes
all of them for every token. A *sparse* model computes only a fraction, chosen per token: here
**{a.spec.policy}** at density **{a.spec.density:g}**.

- **Heatmap**: one row per token, one column per neuron. The colour's strength is the neuron's
  activation |h|; **warm colours are neurons the sparse model computed, cool colours the ones it
  skipped**. A good policy skips only neurons that were small anyway. Click a cell to see that
  neuron over a whole corpus (when this model has a profile).
- **Token detail**: for one token, its strongest neurons in the dense model next to the values the
  sparse model computed (0 when it skipped them).
- **Density per token and layer**: how many neurons each token used. With `topk` every cell is the
  same; with `threshold` tokens differ.
""")

left, mid, right = st.columns([1, 1, 2])
with left:
    layer = layer_picker(a)
with mid:
    order = st.radio("Neuron order", ["index", "frequency", "clustered"], horizontal=True, key="order",
                     bind="query-params", help="index: neuron number; frequency: most often selected first; "
                     "clustered: neurons that fire together side by side")
with right:
    token = token_picker(a)


def _remember_click(shown: dict) -> None:
    """on_select: keep the clicked cell (the run and layer shown, token, neuron) for the link below."""
    cell = firing.clicked_cell(st.session_state["firing_heatmap"].get("selection"))
    st.session_state["firing_cell"] = None if cell is None else dict(shown, token=cell[0], neuron=cell[1])


def corpus_link(profile: dict, unit: int, label: str) -> None:
    """A link to the Corpus page's neuron view of `unit` in the shown layer."""
    page_link("pages/corpus.py", label, icon=":material/library_books:",
              query_params={"profile": profile["id"], "layer": layer, "neuron": unit})


profile, cell = profile_of_model(a.spec.model), st.session_state.get("firing_cell")
heat = firing.firing_heatmap(a, layer, order=order, clickable=profile is not None)   # a click leads to the profile
shown = dict(model=a.spec.model, prompt=a.spec.prompt, layer=layer)
st.plotly_chart(heat.fig, width="stretch", key="firing_heatmap", on_select=partial(_remember_click, shown),
                selection_mode="points", config={"displayModeBar": "hover", "displaylogo": False})
if heat.note:
    st.caption(heat.note)
if profile is None:
    st.caption("Hover a cell for its neuron and value. With a corpus profile of this model (Corpus page), a click "
               "on a cell opens that neuron over the corpus.")
if cell and all(cell.get(k) == v for k, v in shown.items()) and 0 <= cell.get("neuron", -1) < a.n_neurons:
    if profile:
        corpus_link(profile, cell["neuron"], f"Neuron {cell['neuron']} over a corpus (the cell you clicked, "
                                             f"token {cell['token']})")
    else:
        st.caption(f"Neuron {cell['neuron']} has no corpus view yet: no profile of this model exists. "
                   "Make one on the Corpus page or with `python -m sam_viz profile`.")
c1, c2 = st.columns(2)
with c1:
    show(firing.token_neurons(a, layer, token), key="token_neurons")
    unit = strongest_unit(a, layer, token)
    if profile and unit is not None:
        corpus_link(profile, unit, f"This neuron over a corpus (neuron {unit}, the token's strongest)")
with c2:
    show(firing.density_tokens_layers(a), key="density_tokens_layers")
if a.n_experts:
    show(firing.expert_heatmap(a, layer), key="expert_heatmap")
