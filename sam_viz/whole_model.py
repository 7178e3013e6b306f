"""What the Whole model page draws from (issue 22, section 5; DESIGN.md "Sparsity on every projection"):
the inputs x of one layer's projections in a scope-all run, the masks that topk (Q-Sparse), teal (TEAL)
and wina (WINA) would keep on them, the "massive activation" channels (Sun et al. 2024, locuslab's
massive-activations: a handful of channels whose magnitude stands orders above the rest, found from the
data, never from fixed indices), the mass each projection keeps, the allocation of a block's density over
its projections (uniform beside TEAL's greedy, with the block output error), and a quality sweep against
whole-model density. Plain data out; figures in sam_viz.figures.whole_model.

Whole-model density everywhere: the share of the blocks' matrix weights read per token; embeddings
and the unembedding, which stay dense, are not counted.
"""
from __future__ import annotations

import torch

from sam_viz.models import InputError, LoadedModel, get_path
from sam_viz.models.adapters import mlp_projections
from sam_viz.sparse_ops import InputRecorder, Policy, Recorder, sparsified
from sam_viz.sparse_ops.input_calibration import (InputCalibration, column_norms, get_input_calibration, hooked,
                                                  projection_modules)
from sam_viz.sparse_ops.inputs import install_projections
from sam_viz.sparse_ops.policy import topk_indices

from .analysis import Analysis, Progress, _mlp_scope_work, compare_outputs, encode_prompt, forward
from .spec import RunSpec

MASSIVE_RATIO = 20.0        # a channel is massive when its largest |x| over the tokens is >= 20x the median channel's
TOP_CHANNELS = 8            # channels listed, massive or not, by that ratio
INPUT_POLICIES = ("topk", "teal", "wina")
SWEEP_DENSITIES = (0.25, 0.5, 0.75)   # few: each point is one sparse pass
SWEEP_SERIES = (            # (label, policy, scope, allocation)
    ("topk", "topk", "all", "greedy"), ("teal uniform", "teal", "all", "uniform"),
    ("teal greedy", "teal", "all", "greedy"), ("wina greedy", "wina", "all", "greedy"),
    ("MLP only: topk", "topk", "mlp", "greedy"), ("MLP only: threshold", "threshold", "mlp", "greedy"))


def layer_inputs(loaded: LoadedModel, spec: RunSpec, layer: int) -> dict[str, torch.Tensor]:
    """{projection name: x [T, d_in] float} of `layer` in the run's sparse pass (spec.scope must be all):
    the attention projections' inputs by forward pre-hooks on their wrappers, gate and up the MLP's input,
    down the neurons h. An MoE layer gives its attention projections only (experts keep no masks)."""
    if spec.scope != "all":
        raise InputError("the projections' inputs are recorded under scope all only")
    enc = encode_prompt(loaded, spec.prompt)
    n_tokens = enc["input_ids"].shape[1]
    wrappers = [w for w in install_projections(loaded) if w.layer == layer]
    entry = get_path(loaded.layers[layer], loaded.adapter.entry)
    got: dict[str, torch.Tensor] = {}

    def grab(name):
        def fn(args):
            got[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return fn

    recorder = Recorder(keep_activations=True)
    with hooked([(w, grab(w.name)) for w in wrappers] + [(entry, grab("_mlp_in"))]):
        with sparsified(loaded, spec.to_policy(), kernel=spec.kernel, recorder=recorder):
            forward(loaded, enc)
    mlp_in = got.pop("_mlp_in", None)
    lf = recorder.layers(n_tokens, loaded.n_neurons)[layer]
    if lf.experts is None and mlp_in is not None:
        for role, proj in mlp_projections(loaded.adapter).items():
            if role == "down":
                if lf.activations is not None:
                    got[proj.name] = lf.activations.float()
            else:
                got[proj.name] = mlp_in
    return got


def recorded_masks(analysis: Analysis, layer: int) -> dict[str, torch.Tensor]:
    """{projection name: [T, d_in] bool} the run kept, where its pass recorded them."""
    if not analysis.inputs or layer >= len(analysis.inputs):
        return {}
    out = {name: p.kept_mask() for name, p in analysis.inputs[layer].items()}
    return {name: m for name, m in out.items() if m is not None}


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """[T, d_in] bool: per token the k = round(density * d_in) largest |x_i| (Q-Sparse), ties to the lower index."""
    k = Policy("topk", density).k(x.shape[-1])
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, topk_indices(x, k), True)


def column_norm(loaded: LoadedModel, layer: int, name: str) -> torch.Tensor | None:
    """||W[:, i]||_2 of projection `name` of `layer` ([d_in]); None where the family has no declared input
    calibration (MoE)."""
    try:
        module = projection_modules(loaded)[layer].get(name)
    except InputError:
        return None
    return None if module is None else column_norms(module, loaded.adapter.conv1d)


def policy_masks(x: torch.Tensor, density: float, layer: int, name: str, allocation: str,
                 cal: InputCalibration | None, colnorm: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{policy: [T, d_in] bool} that topk, teal and wina keep of the same input x at the block target
    `density` (teal, wina: the calibration's threshold for this projection under `allocation`; left out
    without a calibration)."""
    out = {"topk": topk_mask(x, density)}
    if cal is not None and name in cal.projections:
        out["teal"] = x.abs() > cal.threshold(layer, name, density, allocation, "teal")
        if colnorm is not None:
            out["wina"] = x.abs() * colnorm > cal.threshold(layer, name, density, allocation, "wina")
    return out


def massive_channels(x: torch.Tensor, ratio: float = MASSIVE_RATIO, top: int = TOP_CHANNELS) -> list[dict]:
    """The `top` channels of x [T, d_in] by peak / median peak (peak: a channel's largest |x| over the tokens;
    the median over channels as numpy's, the mean of the middle two for an even count), largest first;
    `massive` where that ratio is at least `ratio`."""
    peak = x.abs().amax(0).double()                                   # [d_in]
    median = float(peak.quantile(0.5))
    scale = peak / max(median, 1e-12)
    order = torch.sort(scale, descending=True, stable=True).indices[:top]
    return [{"channel": int(c), "peak": float(peak[c]), "ratio": float(scale[c]), "massive": bool(scale[c] >= ratio)}
            for c in order]


def keep_rates(masks: dict[str, torch.Tensor], channels: list[int]) -> dict[str, list[float]]:
    """{policy: per channel, the share of tokens whose input that policy keeps}."""
    return {policy: [float(m[:, c].float().mean()) for c in channels] for policy, m in masks.items()}


def mass_kept(x: torch.Tensor, mask: torch.Tensor, colnorm: torch.Tensor | None = None) -> float:
    """Share of sum |x_i| (wina: of sum |x_i| * ||W[:, i]||) over every token that the kept entries carry."""
    score = x.abs() if colnorm is None else x.abs() * colnorm
    total = float(score.sum())
    return float((score * mask).sum()) / total if total else 1.0


def allocation_grids(cal: InputCalibration, density: float, kind: str) -> dict:
    """Per allocation (uniform, greedy), the layers x projections input densities at the block target
    `density`, and each layer's block output error (relative squared error of the layer's output)."""
    layers = range(cal.weights.shape[0])
    return {"projections": list(cal.projections),
            "density": {a: [[cal.densities(i, density, a, kind)[p] for p in cal.projections] for i in layers]
                        for a in ("uniform", "greedy")},
            "error": {a: [cal.block_error_at(i, density, a, kind) for i in layers] for a in ("uniform", "greedy")}}


def measured_grid(analysis: Analysis) -> dict:
    """The run's own measured input density per layer and projection (topk, dense: no calibration)."""
    names = list(dict.fromkeys(n for layer in analysis.projections or [] for n in layer))
    return {"projections": names,
            "density": {"measured": [[layer.get(n, float("nan")) for n in names] for layer in analysis.projections]},
            "error": None}


def input_calibration(loaded: LoadedModel, train: bool = False,
                      progress: Progress | None = None) -> InputCalibration | None:
    """The model's input calibration (computed here only when `train`); None where there is none yet, or for
    a family teal and wina do not cover."""
    try:
        return get_input_calibration(loaded, progress=progress, train=train)
    except InputError:
        return None


def whole_model_sweep(loaded: LoadedModel, spec: RunSpec, densities=SWEEP_DENSITIES, series=SWEEP_SERIES,
                      progress: Progress | None = None) -> tuple[list[dict], list[str]]:
    """Output quality (KL for causal LMs, embedding cosine for encoders) against whole-model density for
    each series at each density: whole-model policies at their measured density, the MLP-only ones at the
    whole-model work they do (attention dense). Returns (rows, one sentence per series left out)."""
    step = progress or (lambda frac, text: None)
    enc = encode_prompt(loaded, spec.prompt)
    n = enc["input_ids"].shape[1]
    dense = forward(loaded, enc)
    metric = "kl" if loaded.kind == "causal-lm" else "cosine"
    rows, skipped, total = [], [], len(series) * len(densities)
    for s, (label, policy, scope, allocation) in enumerate(series):
        for d, density in enumerate(densities):
            step((s * len(densities) + d) / total, f"{label} at density {density:g}")
            try:
                row = _sweep_point(loaded, spec, enc, n, Policy(policy, density, scope, allocation))
            except InputError as exc:
                skipped.append(f"{label}: {exc}")
                break
            value = compare_outputs(loaded.kind, dense, row.pop("outputs"), enc["attention_mask"])[metric]
            rows.append({"series": label, "policy": policy, "scope": scope, "allocation": allocation,
                         "density": density, "metric": metric, "value": value, **row})
    step(1.0, "done")
    return rows, skipped


def _sweep_point(loaded: LoadedModel, spec: RunSpec, enc: dict, n: int, policy: Policy) -> dict:
    if policy.scope == "all":
        inputs = InputRecorder()
        with sparsified(loaded, policy, kernel=spec.kernel, inputs=inputs):
            out = forward(loaded, enc)
        return {"outputs": out, "model_density": inputs.model_density(n)}
    rec = Recorder()
    with sparsified(loaded, policy, kernel=spec.kernel, recorder=rec):
        out = forward(loaded, enc)
    _, density = _mlp_scope_work(loaded, rec.layers(n, loaded.n_neurons), n)
    if density is None:
        raise InputError(f"{loaded.model_type} declares no attention projections, so its whole-model work is unknown")
    return {"outputs": out, "model_density": density}
