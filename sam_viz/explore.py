"""Follow-up computations a page asks for on demand: a density sweep, a greedy continuation by
the dense and the sparse model, and the mass-kept-vs-density curve of a captured run."""
from __future__ import annotations

import torch

from sam_viz.models import LoadedModel
from sam_viz.sparse_ops import Policy, Recorder, sparsified

from .analysis import Analysis, Progress, compare_outputs, encode_prompt, forward
from .spec import RunSpec
from .text import decoded_pieces

SWEEP_DENSITIES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SWEEP_POLICIES = ("topk", "threshold")
MAX_CONTINUATION = 64


def density_sweep(loaded: LoadedModel, spec: RunSpec, densities=SWEEP_DENSITIES, policies=SWEEP_POLICIES,
                  progress: Progress | None = None) -> list[dict]:
    """Output quality vs density (KL for causal LMs, embedding cosine for encoders), per policy."""
    step = progress or (lambda frac, text: None)
    enc = encode_prompt(loaded, spec.prompt)
    n = enc["input_ids"].shape[1]
    dense = forward(loaded, enc)
    metric = "kl" if loaded.kind == "causal-lm" else "cosine"
    rows, total = [], len(densities) * len(policies)
    for i, (policy, density) in enumerate((p, d) for p in policies for d in densities):
        step(i / total, f"{policy} at density {density:g}")
        rec = Recorder()
        with sparsified(loaded, Policy(policy, density), kernel=spec.kernel, recorder=rec):
            sparse = forward(loaded, enc)
        layers = rec.layers(n, loaded.n_neurons)
        achieved = sum(float(l.selected.sum()) for l in layers) / sum(float(l.possible.sum()) for l in layers)
        value = compare_outputs(loaded.kind, dense, sparse, enc["attention_mask"])[metric]
        rows.append({"policy": policy, "density": density, "achieved_density": achieved,
                     "metric": metric, "value": value})
    step(1.0, "done")
    return rows


def greedy_continuation(loaded: LoadedModel, spec: RunSpec, n_new: int = 20) -> dict:
    """Causal LMs: n_new greedy tokens from the dense and from the sparse model, each as the text it
    adds to the prompt (sam_viz.text.decoded_pieces), and the first position where the tokens
    differ (None if they agree)."""
    if loaded.kind != "causal-lm":
        raise ValueError("greedy continuation needs a causal LM")
    n_new = max(1, min(int(n_new), MAX_CONTINUATION))
    enc = encode_prompt(loaded, spec.prompt)
    ids = enc["input_ids"]
    budget = max(0, loaded.max_tokens - ids.shape[1])
    n_new = min(n_new, budget)

    def generate(policy: Policy | None) -> list[int]:
        seq = ids.clone()
        with torch.no_grad():
            for _ in range(n_new):
                if policy is None:
                    logits = loaded.model(input_ids=seq).logits
                else:
                    with sparsified(loaded, policy, kernel=spec.kernel):
                        logits = loaded.model(input_ids=seq).logits
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq[0, ids.shape[1]:].tolist()

    dense, sparse = generate(None), generate(spec.to_policy())
    first = next((i for i, (a, b) in enumerate(zip(dense, sparse)) if a != b), None)
    context = ids[0].tolist()
    return {"dense": decoded_pieces(loaded.decode, context, dense),
            "sparse": decoded_pieces(loaded.decode, context, sparse),
            "first_divergence": first}


def mass_curve(analysis: Analysis, densities=SWEEP_DENSITIES, dense_pass: bool = True) -> list[list[float]]:
    """[layer][density]: share of sum abs(h) that the top round(density * n) neurons of each token keep,
    from the captured activations (n = neurons the token could use: d_ff, or top_k * d_ff for MoE)."""
    layers = analysis.dense_layers if dense_pass else analysis.layers
    out = []
    for layer in layers:
        a = layer.activations.float().abs()                              # [T, n_neurons]
        sorted_a = torch.sort(a, dim=-1, descending=True).values
        cum = torch.cumsum(sorted_a, dim=-1)
        total = cum[:, -1].clamp(min=1e-12)
        row = []
        for d in densities:
            k = (layer.possible.float() * d).round().clamp(min=1).long() - 1    # [T]
            kept = cum.gather(1, k[:, None])[:, 0]
            row.append(float(kept.sum() / total.sum()))
        out.append(row)
    return out





def firing_counts(analysis: Analysis, layer: int) -> torch.Tensor:
    """[n_neurons]: for how many of the prompt's tokens the sparse pass computed each neuron."""
    lf = analysis.layers[layer]
    if lf.ids is None:
        return torch.full((analysis.n_neurons,), len(analysis.tokens), dtype=torch.long)
    return torch.bincount(lf.ids.long(), minlength=analysis.n_neurons)


def calibration_counts(loaded: LoadedModel, layer: int, density: float) -> tuple[torch.Tensor, int] | None:
    """([n_neurons] oracle top-k counts over the calibration text, tokens), or None when the model
    has no stored calibration (nothing is trained here)."""
    from sam_viz.sparse_ops import GRID, get_calibration

    cal = get_calibration(loaded, train=False)
    if cal is None:
        return None
    row = min(range(len(GRID)), key=lambda i: abs(GRID[i] - density))
    units = sorted(u for u in cal.counts if u[0] == layer)
    counts = torch.cat([cal.counts[u][row].long() for u in units])
    return counts, cal.n_tokens
