"""A merged stats.Partial -> the profile's Parquet tables (schema.md), as pyarrow Tables.

Derived here, at the end, from the exact merged state: quantile bands (relative to each unit's max
|h|, cut from the hash samples), the 64 hottest units' co-firing (from the sampled tokens' bits),
per-layer ratios, and the logit effects of a causal LM's neurons (from the weights alone).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from .stats import EMPTY, Partial, sample_hash

BANDS = tuple((i / 5, (i + 1) / 5) for i in range(5))
BAND_NAMES = ("top", *(f"q{i}" for i in range(len(BANDS))))
PER_BAND = 4                                  # quantile samples per band
RADIUS = 8                                    # tokens either side of an example
HOT = 64                                      # units whose co-firing is stored, per layer
LOGIT_TOP = 10
LOGIT_NOTE = ("W_U · (final-norm weight ⊙ W_down[:, j]): the final norm's scale (1 + w for Gemma) is folded "
              "in; its normalisation, bias and the residual stream are ignored")


def _list(values: np.ndarray, offsets: np.ndarray, type_) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type_))


def neurons_table(p: Partial) -> pa.Table:
    L, U = p.fire.shape
    B = p.hist.shape[-1]
    return pa.table({
        "layer": np.repeat(np.arange(L, dtype=np.int32), U), "neuron": np.tile(np.arange(U, dtype=np.int32), L),
        "tokens": p.tokens.ravel(), "fire_count": p.fire.ravel(), "select_count": p.select.ravel(),
        "sum_abs": p.sum_abs.ravel(), "max_abs": p.max_abs.ravel(),
        "hist": _list(p.hist.ravel(), np.arange(L * U + 1) * B, pa.int64())})


def _ratio(a: np.ndarray, b: np.ndarray, empty: float = 0.0) -> np.ndarray:
    return np.where(b > 0, a / np.maximum(b, 1), empty)


def layers_table(p: Partial, moe: bool) -> pa.Table:
    L = p.fire.shape[0]
    routing = p.routed.sum(1) > 0 if moe else np.zeros(L, bool)       # a dense layer of an MoE model: no router
    entropy = pa.array(np.where(routing, _ratio(p.entropy_sum, p.layer_tokens), np.nan) if moe else [None] * L,
                       pa.float64(), from_pandas=True)
    return pa.table({
        "layer": np.arange(L, dtype=np.int32), "tokens": p.layer_tokens,
        "density": _ratio(p.selected, p.possible), "oracle_density": _ratio(p.fire.sum(1), p.possible),
        "mass_kept": _ratio(p.mass_kept, p.mass_total, 1.0), "recall": _ratio(p.hits, p.oracle, 1.0),
        "precision": _ratio(p.hits, p.selected, 1.0), "dead": (p.fire == 0).sum(1).astype(np.int64),
        "always_on": ((p.fire == p.tokens) & (p.tokens > 0)).sum(1).astype(np.int64), "router_entropy": entropy})


def experts_table(p: Partial) -> pa.Table:
    L, E = p.routed.shape
    share = p.routed / np.maximum(p.routed.sum(1, keepdims=True), 1)
    return pa.table({"layer": np.repeat(np.arange(L, dtype=np.int32), E),
                     "expert": np.tile(np.arange(E, dtype=np.int32), L),
                     "tokens_routed": p.routed.ravel(), "share": share.ravel()})


def _examples(p: Partial) -> dict[str, np.ndarray]:
    """Top and quantile-band entries as flat columns (no token text yet; band as an index of BAND_NAMES)."""
    L, U, K = p.top_key.shape
    li, ui, ri = np.indices((L, U, K)).reshape(3, -1)
    full = p.top_key.ravel() >= 0
    top = dict(layer=li[full], neuron=ui[full], band=np.zeros(full.sum(), np.int8), rank=ri[full],
               value=p.top_val.ravel()[full], doc=p.top_doc.ravel()[full], pos=p.top_pos.ravel()[full])
    L, U, NB, S = p.smp_doc.shape
    li, ui = (x.reshape(-1) for x in np.indices((L, U, NB * S))[:2])
    h = sample_hash(p.smp_doc, p.smp_pos).ravel()
    val = p.smp_val.ravel()
    mx = p.max_abs[li, ui]
    band = np.minimum((np.abs(val) / np.where(mx > 0, mx, 1) * len(BANDS)).astype(np.int64), len(BANDS) - 1)
    ok = h != EMPTY
    li, ui, band, h, val = li[ok], ui[ok], band[ok], h[ok], val[ok]
    doc, pos = p.smp_doc.ravel()[ok], p.smp_pos.ravel()[ok]
    order = np.lexsort((h, band, ui, li))
    group = (li[order] * U + ui[order]) * len(BANDS) + band[order]
    start = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1] if group.size else np.zeros(0, np.int64)
    rank = np.arange(group.size) - np.repeat(start, np.diff(np.r_[start, group.size]))
    keep = order[rank < PER_BAND]
    q = dict(layer=li[keep], neuron=ui[keep], band=(band[keep] + 1).astype(np.int8),
             rank=rank[rank < PER_BAND], value=val[keep], doc=doc[keep], pos=pos[keep])
    return {k: np.concatenate([top[k], q[k]]) for k in top}


def examples_table(p: Partial, stream, token_strings) -> pa.Table:
    """token_strings(ids: np.ndarray) -> list[str] of readable tokens. The text columns are Arrow
    takes from the strings of the distinct tokens and band names, not a Python object per entry
    (the examples of a small model's saturated profile are ~6M context tokens)."""
    ex = _examples(p)
    first = np.searchsorted(stream.doc, ex["doc"])
    last = np.searchsorted(stream.doc, ex["doc"], side="right")
    a = np.maximum(first, first + ex["pos"] - RADIUS)
    b = np.minimum(last, first + ex["pos"] + RADIUS + 1)
    lengths = b - a
    offsets = np.r_[0, np.cumsum(lengths)]
    ids = stream.ids[np.repeat(a - offsets[:-1], lengths) + np.arange(offsets[-1])]
    uniq = np.flatnonzero(np.bincount(ids)) if ids.size else ids               # distinct token ids, ascending
    index = np.zeros(uniq[-1] + 1 if uniq.size else 0, np.int32)
    index[uniq] = np.arange(uniq.size)
    text = pa.array(token_strings(uniq) if uniq.size else [], pa.string()).take(pa.array(index[ids]))
    return pa.table({
        "layer": ex["layer"].astype(np.int32), "neuron": ex["neuron"].astype(np.int32),
        "band": pa.array(BAND_NAMES, pa.string()).take(pa.array(ex["band"])), "rank": ex["rank"].astype(np.int32),
        "value": ex["value"].astype(np.float64), "doc": ex["doc"].astype(np.int64), "pos": ex["pos"].astype(np.int64),
        "tokens": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), text),
        "focus": (first + ex["pos"] - a).astype(np.int32)})


def cofire_table(p: Partial) -> tuple[pa.Table, int]:
    """Co-firing of each layer's HOT units with the most firings (ties to the lower id), on the
    sampled tokens; a_count / b_count: each unit's firings on those tokens. Returns (table, tokens)."""
    n = int((p.cf_hash != EMPTY).sum())
    L, U = p.fire.shape
    cols = {k: [] for k in ("layer", "a", "b", "both", "tokens", "a_count", "b_count")}
    for layer in range(L):
        hot = np.sort(np.lexsort((np.arange(U), -p.fire[layer]))[:min(HOT, U)])
        bits = np.unpackbits(p.cf_bits[:n, layer], axis=-1, count=U)[:, hot].astype(np.int64)   # [n, hot]
        both = bits.T @ bits
        i, j = np.triu_indices(hot.size, 1)
        cols["layer"].append(np.full(i.size, layer, np.int32))
        cols["a"].append(hot[i].astype(np.int32))
        cols["b"].append(hot[j].astype(np.int32))
        cols["both"].append(both[i, j])
        cols["tokens"].append(np.full(i.size, n, np.int64))
        cols["a_count"].append(both[i, i])
        cols["b_count"].append(both[j, j])
    return pa.table({k: np.concatenate(v) for k, v in cols.items()}), n


def _final_norm_scale(loaded) -> torch.Tensor | None:
    """The final norm's per-channel scale, found by evaluating the norm (as the cpu kernel tells
    activations apart): for a probe x of mean 0, norm(x) - norm(-x) = 2 x scale / rms(x), whether it
    is a LayerNorm, an RMSNorm or Gemma's RMSNorm with its (1 + w). Two probes, so that an odd width
    has no channel left at 0."""
    module = _final_norm(loaded.model.base_model)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    d = weight.shape[-1]
    first = torch.tensor([(-1.0) ** i for i in range(d)])
    if d % 2:
        first[-1] = 0.0                                  # mean 0 at an odd width
    scales = []
    with torch.no_grad():
        for x in (first, first.roll(1)):
            probe = x.to(weight.dtype).to(weight.device)[None]
            diff = (module(probe) - module(-probe))[0].float().cpu()
            scales.append(diff / (2 * torch.where(x != 0, x, 1.0)) * x.pow(2).mean().sqrt())
    return torch.where(first != 0, scales[0], scales[1]).to(weight.device)


def _final_norm(base):
    for path in ("norm", "ln_f", "final_layer_norm", "decoder.final_layer_norm"):
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if module is not None:
            return module
    return None


def logits_table(loaded, token_strings) -> pa.Table:
    """Per neuron, the LOGIT_TOP tokens its output direction boosts and suppresses most."""
    from sam_viz.sparse_ops import install

    unembed = loaded.model.get_output_embeddings().weight.detach().float()          # [V, d]
    scale = _final_norm_scale(loaded)
    cols = {k: [] for k in ("layer", "neuron", "sign", "rank", "token_id", "value")}
    for layer, wrapper in enumerate(install(loaded)):
        units = sorted(u for u in wrapper.offsets if u >= 0) if wrapper.moe else [-1]   # routed, shared; or the MLP
        for e in units:
            down = wrapper.weights(None if e < 0 else e).down_t.detach().float()          # [d_ff, d]
            if scale is not None:
                down = down * scale
            for a in range(0, down.shape[0], 1024):
                effect = down[a:a + 1024] @ unembed.T                                      # [c, V]
                for sign, vals in (("boost", effect), ("suppress", -effect)):
                    top = vals.topk(LOGIT_TOP, dim=1)
                    c = effect.shape[0]
                    cols["layer"].append(np.full(c * LOGIT_TOP, layer, np.int32))
                    cols["neuron"].append(np.repeat(np.arange(c) + a + wrapper.offsets[e], LOGIT_TOP).astype(np.int32))
                    cols["sign"].append(np.full(c * LOGIT_TOP, sign, dtype=object))
                    cols["rank"].append(np.tile(np.arange(LOGIT_TOP, dtype=np.int32), c))
                    cols["token_id"].append(top.indices.reshape(-1).cpu().numpy().astype(np.int64))
                    value = top.values if sign == "boost" else -top.values
                    cols["value"].append(value.reshape(-1).double().cpu().numpy())
    out = {k: np.concatenate(v) for k, v in cols.items()}
    uniq, inverse = np.unique(out["token_id"], return_inverse=True)
    tokens = np.array(token_strings(uniq), dtype=object)[inverse]
    return pa.table({"layer": out["layer"], "neuron": out["neuron"], "sign": pa.array(out["sign"], pa.string()),
                     "rank": out["rank"], "token_id": out["token_id"], "token": pa.array(tokens, pa.string()),
                     "value": out["value"]})
