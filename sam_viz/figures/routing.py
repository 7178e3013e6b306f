"""Figures of how well neurons are routed: recall of each policy against the oracle top-k, hot and
cold neurons, co-firing of the top neurons, and for MoE models router entropy and expert load.
Pure functions, bounded like sam_viz.figures.firing (data in, Plot out)."""
from __future__ import annotations

import html
import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..analysis import Analysis
from .firing import MAX_CELLS, Plot, _empty
from .layout import titled

POLICY_COLORS = {"topk": "#636efa", "threshold": "#ef553b", "predictor": "#00cc96", "static": "#ab63fa",
                 "dense": "#7f7f7f"}
MAX_POINTS = 4000
READ_COLOR = "#7f7f7f"      # weights read: a cost, apart from the quality bars
ENTROPY_SCALE = "Plasma"   # not Magma or Inferno: their first stop, #000004, is a placeholder colour that
                           # Streamlit's chart theme rewrites (to a categorical colour: a colour bar that wraps)


def _style(fig: go.Figure, title: str, x: str, y: str, sub: str = "", **layout) -> go.Figure:
    fig.update_layout(xaxis_title=x, yaxis_title=y, template="plotly_white", **titled(title, sub), **layout)
    return fig


def recall_by_policy(analyses: dict[str, Analysis]) -> Plot:
    """Per layer: share of the oracle top-k neurons each policy selected, at one density."""
    fig = go.Figure()
    for name, a in analyses.items():
        recall = [l.recall for l in a.layers]
        if any(r is None for r in recall):
            continue
        fig.add_trace(go.Scatter(x=list(range(len(recall))), y=recall, mode="lines+markers", name=name,
                                 line=dict(color=POLICY_COLORS.get(name))))
    density = next(iter(analyses.values())).spec.density if analyses else 0
    return Plot(_style(fig, "Recall of the oracle top-k per layer", "layer",
                       "recall (share of the oracle's neurons selected)", sub=f"every policy at density {density:g}",
                       yaxis_range=[0, 1.02], xaxis_dtick=1))


def policy_summary(analyses: dict[str, Analysis]) -> Plot:
    """Per policy at the same density, in two panels so that no bar is read the wrong way: left, what
    is better higher (mean recall, mean mass kept, output agreement with dense); right, what is
    better lower (the share of dense MLP weights read)."""
    names = list(analyses)
    metric = "cosine" if next(iter(analyses.values())).kind == "encoder" else "top1_agreement"
    better_higher = {
        "recall": [_mean([l.recall for l in analyses[n].layers]) for n in names],
        "mass kept": [_mean([l.mass_kept_share for l in analyses[n].layers]) for n in names],
        metric.replace("_", " ") + " vs dense": [analyses[n].compare[metric] for n in names],
    }
    read = [(analyses[n].cost or {}).get("ratio") for n in names]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.12,
                        subplot_titles=("↑ higher is better", "↓ lower is better"))
    for label, values in better_higher.items():
        fig.add_trace(go.Bar(name=label, x=names, y=values, hovertemplate=f"%{{x}}: {label} %{{y:.3f}}<extra></extra>"),
                      row=1, col=1)
    fig.add_trace(go.Bar(name="MLP weights read (share of dense)", x=names, y=read, marker_color=READ_COLOR,
                         hovertemplate="%{x}: reads %{y:.1%} of dense MLP weights<extra></extra>"), row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], row=1, col=1, title_text="share (0 to 1)")
    fig.update_yaxes(range=[0, 1.02], row=1, col=2, tickformat=".0%", title_text="weights read vs dense")
    fig.update_xaxes(title_text="policy")
    fig.update_layout(template="plotly_white", barmode="group", legend=dict(orientation="h", y=-0.3),
                      **titled("Policies side by side at the same density", "recall and mass kept: means over layers",
                               bottom=90, subplot_titles=True))
    return Plot(fig)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def firing_frequency(counts: torch.Tensor, n_tokens: int, layer: int, source: str) -> Plot:
    """Neurons of a layer sorted by how often they were selected, hot on the left, cold on the right;
    `source` says by what and on which text, e.g. "the topk policy on this prompt"."""
    order = torch.sort(-counts.double(), stable=True).indices
    share = (counts.double()[order] / max(1, n_tokens)).tolist()
    step = max(1, len(share) // MAX_POINTS)
    xs = list(range(0, len(share), step))
    fig = go.Figure(go.Scatter(x=xs, y=share[::step], mode="lines", fill="tozeroy",
                               customdata=order[::step].tolist(),
                               hovertemplate="rank %{x}<br>neuron %{customdata}<br>fired for %{y:.0%} of tokens"
                                             "<extra></extra>"))
    note = f"Every {step}th neuron shown ({len(share):,} in all)." if step > 1 else ""
    never = int((counts == 0).sum())
    always = int((counts >= n_tokens).sum())
    fig.add_annotation(x=0.99, y=0.95, xref="paper", yref="paper", showarrow=False, align="right",
                       text=f"{always} always on · {never} never on")
    return Plot(_style(fig, f"Layer {layer}: how often each neuron fires", "neurons, most often selected first",
                       "share of tokens", sub=f"{source}, {n_tokens:,} tokens", yaxis_range=[0, 1.02],
                       yaxis_tickformat=".0%"), note)


def cofiring(a: Analysis, layer: int, top: int = 30, max_cells: int = MAX_CELLS) -> Plot:
    """Jaccard overlap of the token sets of the `top` most often selected neurons of a layer."""
    lf = a.layers[layer]
    if lf.ids is None:
        return _empty("Every neuron fired for every token (dense): nothing to compare.")
    n = len(a.tokens)
    fired = torch.zeros(n, a.n_neurons, dtype=torch.bool)
    for t in range(n):
        fired[t, lf.token(t)[0].long()] = True
    top = max(2, min(top, int(max_cells ** 0.5), a.n_neurons))
    ids = torch.sort(-fired.sum(0), stable=True).indices[:top]
    f = fired[:, ids].double()                                           # [T, top]
    inter = f.T @ f
    union = f.sum(0)[:, None] + f.sum(0)[None, :] - inter
    jaccard = (inter / union.clamp(min=1)).tolist()
    labels = [f"n{int(i)}" for i in ids]
    fig = go.Figure(go.Heatmap(z=jaccard, x=labels, y=labels, colorscale="Viridis", zmin=0, zmax=1,
                               colorbar=dict(title="Jaccard"),
                               hovertemplate="%{x} & %{y}: fire together %{z:.0%}<extra></extra>"))
    return Plot(_style(fig, f"Layer {layer}: co-firing of the top {top} neurons", "neuron", "neuron",
                       sub="Jaccard overlap of the tokens each fires for", height=520, yaxis_autorange="reversed"))


def _moe_layers(a: Analysis) -> list[int]:
    """Layers that route (an MoE model may have dense layers: DeepSeek's first ones, Llama 4's interleaved)."""
    return [i for i, l in enumerate(a.layers) if l.experts is not None]


def _dense_note(a: Analysis, moe: list[int]) -> str:
    dense = [i for i in range(a.n_layers) if i not in moe]
    if not dense:
        return ""
    return f"Layer{'s' if len(dense) > 1 else ''} {', '.join(map(str, dense))}: dense MLP, no router (not shown)."


def router_entropy(a: Analysis) -> Plot:
    """MoE: entropy of the router's distribution per token and layer, on the whole scale from 0
    (certain) to ln(experts) (uniform); one column per routing layer. Sigmoid routers' scores are
    normalised to a distribution first (sam_viz.models.adapters.route)."""
    if not a.n_experts:
        return _empty("Not a mixture-of-experts model: there is no router.")
    moe = _moe_layers(a)
    ent = torch.stack([a.layers[i].router_entropy for i in moe], dim=1)      # [T, L_moe]
    top = math.log(a.n_experts)
    labels = [f"{i}: {html.escape(t)}" for i, t in enumerate(a.tokens)]
    fig = go.Figure(go.Heatmap(z=ent.tolist(), x=moe, y=labels, colorscale=ENTROPY_SCALE, zmin=0,
                               zmax=top, colorbar=dict(title=dict(text="nats", side="top"), thickness=14, len=1),
                               hovertemplate="%{y}, layer %{x}: entropy %{z:.2f} nats<extra></extra>"))
    sub = f"0 = certain, {top:.2f} = uniform; here {float(ent.min()):.2f} to {float(ent.max()):.2f}"
    return Plot(_style(fig, "Router entropy per token and layer", "layer", "token", sub=sub,
                       xaxis=dict(type="category", tickvals=moe),
                       yaxis=dict(type="category", autorange="reversed")), _dense_note(a, moe))


def expert_load(a: Analysis) -> Plot:
    """MoE: share of the prompt's tokens each expert received, per routing layer (layer 0 at the top);
    the shared experts, when the model has them, are a last column at 100%: every token goes through them."""
    if not a.n_experts:
        return _empty("Not a mixture-of-experts model: there are no experts.")
    moe, shared = _moe_layers(a), [1.0] if a.n_shared else []
    load = [torch.bincount(a.layers[i].experts.long().flatten(), minlength=a.n_experts).double().div(len(a.tokens))
            .tolist() + shared for i in moe]
    names = [f"expert {e}" for e in range(a.n_experts)] + (["shared"] if shared else [])
    fig = go.Figure(go.Heatmap(z=load, x=names, y=[f"layer {i}" for i in moe], colorscale="Blues", zmin=0, zmax=1,
                               colorbar=dict(title=dict(text="share", side="top"), tickformat=".0%"),
                               hovertemplate="%{y}, %{x}: %{z:.0%} of tokens<extra></extra>"))
    sub = "share of the prompt's tokens routed to each expert" + ("; shared: every token" if shared else "")
    return Plot(_style(fig, "Expert load per layer", "expert", "layer", sub=sub,
                       yaxis=dict(type="category", autorange="reversed")), _dense_note(a, moe))


def neuron_attribution_plot(attribution, layer: int, top: int = 20) -> Plot:
    """The layer's `top` neurons by |dense attribution| (summed over tokens): dense next to sparse,
    each labelled with the number of tokens for which the sparse model computed it. A model whose
    attributions are within rounding noise (attribution.neuron_noise) is left out, and ranks nothing."""
    series = [(name, values) for name, values, noise in
              zip(("dense", "sparse"), (attribution.neurons_dense[layer], attribution.neurons_sparse[layer]),
                  attribution.neuron_noise[layer]) if not noise]
    rank = series[0][1] if series else attribution.neurons_dense[layer]
    ids = torch.topk(rank.abs(), min(top, rank.numel()) if series else 0).indices.tolist()[::-1]
    kept, n = attribution.kept[layer], len(attribution.tokens)
    labels = [f"neuron {j} · " + ("dropped" if kept[j] == 0 else f"kept {int(kept[j])}/{n}") for j in ids]
    colors = {"dense": "#636efa", "sparse": "#ef553b"}                # the same colour with or without the other
    fig = go.Figure([go.Bar(name=name, y=labels, x=[float(values[j]) for j in ids], orientation="h",
                            marker_color=colors[name]) for name, values in series])
    return Plot(_style(fig, f"Layer {layer}: neurons carrying the most attribution", "attribution (sum over tokens)",
                       "neuron", sub=f"top {len(ids)} by |{series[0][0] if series else 'dense'} attribution| · "
                       "kept: tokens computed", barmode="group", showlegend=True,
                       height=max(360, 130 + 24 * len(ids))))
