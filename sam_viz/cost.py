"""What the sparse pass costs per token, as a batch-1 decoder would pay it: MLP weight bytes read
and FLOPs, summed over layers, including what the policy itself needs to choose the neurons.

- dense: every neuron (for MoE: every neuron of the experts the router picked).
- topk: the oracle must compute every h_j to rank them, so it saves only the down projection of
  the dropped neurons; it is an upper bound on quality, not a way to save work.
- threshold (CATS): the gate (GLU) or input projection of every neuron to score it, then up and
  down only for the selected ones.
- predictor (Deja Vu): the low-rank predictor, then the selected neurons only.
- static: the selected neurons only.
"""
from __future__ import annotations

from sam_viz.sparse_ops import LayerFiring


def mlp_cost(layers: list[LayerFiring], policy: str, d_model: int, glu: bool, n_tokens: int,
             predictor_params: int = 0, predictor_calls: int = 0, bytes_per_param: int = 4) -> dict:
    """Per-token averages over the prompt. predictor_params: parameters of one predictor call;
    predictor_calls: predictor calls per token over all layers (1 per layer, top_k per MoE layer)."""
    possible = sum(float(l.possible.sum()) for l in layers) / max(1, n_tokens)
    selected = sum(float(l.selected.sum()) for l in layers) / max(1, n_tokens)
    return neuron_cost(possible, selected, policy, d_model, glu, predictor_params, predictor_calls,
                       bytes_per_param)


def neuron_cost(possible: float, selected: float, policy: str, d_model: int, glu: bool,
                predictor_params: int = 0, predictor_calls: int = 0, bytes_per_param: int = 4) -> dict:
    """mlp_cost from the neurons per token, over all layers: `possible` in the dense model,
    `selected` by the policy (what a DensityCounter gives, divided by the tokens)."""
    per_neuron = (3 if glu else 2) * d_model            # gate, up, down rows (or in, down)
    dense = possible * per_neuron
    if policy == "dense":
        choose, compute = 0.0, dense
    elif policy == "topk":
        choose, compute = possible * (per_neuron - d_model), selected * d_model
    elif policy == "threshold":
        choose, compute = possible * d_model, selected * (per_neuron - d_model)
    else:
        choose, compute = 0.0, selected * per_neuron
    predictor = float(predictor_params * predictor_calls) if policy == "predictor" else 0.0
    sparse = choose + compute + predictor
    return {
        "dense_params": dense, "sparse_params": sparse, "select_params": choose, "predictor_params": predictor,
        "dense_bytes": dense * bytes_per_param, "sparse_bytes": sparse * bytes_per_param,
        "predictor_bytes": predictor * bytes_per_param,
        "dense_flops": 2 * dense, "sparse_flops": 2 * sparse, "predictor_flops": 2 * predictor,
        "ratio": sparse / dense if dense else 1.0,
    }


def cost_sentence(kind: str, policy: str) -> str:
    """What the per-token cost counts, worded for the model's kind: a decoder reads the rows of one
    token per step; an encoder runs its tokens in one pass, which reads the union of their rows once."""
    how = ("Per token, as a batch-1 decoder pays it (fp32 weights): each step reads the rows of one token." if
           kind == "causal-lm" else
           "Per token, counted as if each token were computed alone (fp32 weights): this encoder runs all its "
           "tokens in one pass, which reads the union of the rows they select, at most every weight once.")
    why = {"topk": " topk must compute every neuron to rank them.",
           "threshold": " threshold reads every gate (or input) row to score them.",
           "predictor": " The predictor's own weights are included."}.get(policy, "")
    return how + why


def mlp_scope_model_density(attention: int, possible: float, selected: float, d_model: int, glu: bool) -> float:
    """Scope mlp: the share of the blocks' matrix weights read per token (embeddings excluded) with the
    attention projections dense and the MLP at its density. attention: attention weights per token over
    all layers; possible / selected: MLP neurons per token over all layers, in the dense model and
    computed by the policy (each neuron is a row of gate and up, or of W_in, and a column of down)."""
    per_neuron = (3 if glu else 2) * d_model
    total = attention + possible * per_neuron
    return (attention + selected * per_neuron) / total if total else 1.0


def input_cost(read: float, total: float, n_tokens: int, bytes_per_param: int = 4) -> dict:
    """Scope all: mlp_cost's keys for every projection of the blocks, per token. A projection reads the
    columns of its weight for the kept input entries; choosing them reads no weight (topk, teal and
    wina score the input itself; wina's column norms are computed once per weight)."""
    dense, sparse = total / max(1, n_tokens), read / max(1, n_tokens)
    return {
        "dense_params": dense, "sparse_params": sparse, "select_params": 0.0, "predictor_params": 0.0,
        "dense_bytes": dense * bytes_per_param, "sparse_bytes": sparse * bytes_per_param, "predictor_bytes": 0.0,
        "dense_flops": 2 * dense, "sparse_flops": 2 * sparse, "predictor_flops": 0.0,
        "ratio": sparse / dense if dense else 1.0,
    }
