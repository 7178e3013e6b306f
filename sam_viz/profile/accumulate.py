"""One shard's statistics, from the activations h of each MLP call (torch in, a stats.Partial out).

`ShardStats.observe` takes the dense pass's h of one layer (of one expert for MoE) on some rows of
the shard: oracle firing (the k = round(density * d_ff) largest |h| per token, ties to the lower
index, as sparse_ops.policy.topk_indices; and h > 0 for ReLU), sums, maxima, the histogram, top
examples, quantile-sample candidates and co-firing bits. `observe_policy` takes the policy's
selection on the same kind of call: selection counts, mass kept, recall and precision against the
oracle of the h it was given. Nothing here keeps h past the call.
"""
from __future__ import annotations

import numpy as np
import torch

from .stats import (COFIRE, EMPTY, HIST_EDGES, SAMPLE_EDGES, SAMPLE_RATE, SAMPLES, TOP, Layout, Partial,
                    merge_smallest, merge_top, token_hash)

_SAMPLE_LIMIT = (1 << 63) // SAMPLE_RATE


def oracle_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """[n, d] |h| -> [n, d] bool: the k largest per row, ties to the lower index (topk_indices' set)."""
    t = a.topk(k, dim=1).values[:, -1:]                                  # [n, 1] k-th largest
    mask = a >= t
    extra = (mask.float().sum(1) > k).nonzero().flatten()                # rows with ties at t past k
    if extra.numel():
        sub, ts = a[extra], t[extra]
        above, tie = sub > ts, sub == ts
        need = k - above.sum(1, keepdim=True)
        mask[extra] = above | (tie & (tie.cumsum(1) <= need))
    return mask


class ShardStats:
    """Accumulates one shard; `partial()` returns its stats.Partial."""

    def __init__(self, layout: Layout, doc: np.ndarray, pos: np.ndarray):
        self.layout = layout
        self.p = Partial.empty(layout)
        self.doc, self.pos = doc.reshape(-1), pos.reshape(-1)            # [N] per flattened row
        self.hash = token_hash(self.doc, self.pos)
        self.sampled = torch.from_numpy(self.hash < _SAMPLE_LIMIT)
        keep = np.argsort(self.hash, kind="stable")[:COFIRE]              # this shard's co-firing tokens
        self.cf_rows = keep
        self.cf_slot = torch.full((self.doc.size,), -1, dtype=torch.long)
        self.cf_slot[torch.from_numpy(keep)] = torch.arange(keep.size)
        self.cf_bits = torch.zeros(keep.size, layout.n_layers, layout.units, dtype=torch.bool)
        self.sample_edges = torch.tensor(SAMPLE_EDGES, dtype=torch.float32)
        self.edges = torch.tensor(HIST_EDGES, dtype=torch.float32)

    def observe(self, layer: int, rows: torch.Tensor, h: torch.Tensor, offset: int, k: int, relu: bool,
                policy: str | None = None) -> None:
        """Dense h [n, d] of `rows` [n]. policy "topk" / "dense": also count its selection, which on
        this pass is the oracle top-k / every unit (counts of a bool mask are summed as floats: exact
        below 2^24 rows per call, and several times faster)."""
        h = h.detach().float().cpu()
        rows = rows.detach().cpu().long()
        n, d = h.shape
        a = h.abs()
        oracle = oracle_mask(a, k)
        fire = oracle & (h > 0) if relu else oracle
        p, cols = self.p, slice(offset, offset + d)
        p.tokens[layer, cols] += n
        fired = fire.float().sum(0)
        p.fire[layer, cols] += fired.long().numpy()
        col_abs = a.sum(0)                                                # [d] float32, per call
        p.sum_abs[layer, cols] += col_abs.double().numpy()
        p.max_abs[layer, cols] = np.maximum(p.max_abs[layer, cols], a.amax(0).double().numpy())
        p.possible[layer] += n * d
        bins = self.layout.bins
        idx = torch.bucketize(h, self.edges, right=True) + torch.arange(d) * bins
        p.hist[layer, cols] += torch.bincount(idx.flatten(), minlength=d * bins).view(d, bins).numpy()
        self._top(layer, cols, rows, h, a)
        self._samples(layer, cols, rows, h, a)
        slot = self.cf_slot[rows]
        mine = slot >= 0
        self.cf_bits[slot[mine], layer, cols] = fire[mine]
        if policy in ("topk", "dense"):
            total = float(col_abs.double().sum())
            p.mass_total[layer] += total
            p.oracle[layer] += n * k
            p.hits[layer] += n * k
            if policy == "dense":
                p.select[layer, cols] += n
                p.selected[layer] += n * d
                p.mass_kept[layer] += total
            else:
                p.select[layer, cols] += (fired if not relu else oracle.float().sum(0)).long().numpy()
                p.selected[layer] += n * k
                p.mass_kept[layer] += float((a * oracle).sum(dtype=torch.float64))

    def observe_policy(self, layer: int, rows: torch.Tensor, selected: torch.Tensor | None, h: torch.Tensor,
                       offset: int, k: int) -> None:
        """The policy's selection [n, d] bool (None: every unit) on h [n, d] of the same call (a pass
        of its own: recall and precision against the oracle top-k of this h)."""
        a = h.detach().float().cpu().abs()
        n, d = a.shape
        p = self.p
        total = float(a.sum(dtype=torch.float64))
        p.mass_total[layer] += total
        p.oracle[layer] += n * k
        if selected is None:
            p.select[layer, offset:offset + d] += n
            p.selected[layer] += n * d
            p.mass_kept[layer] += total
            p.hits[layer] += n * k
            return
        selected = selected.cpu()
        p.select[layer, offset:offset + d] += selected.float().sum(0).long().numpy()
        p.selected[layer] += int(selected.sum())
        p.mass_kept[layer] += float((a * selected).sum(dtype=torch.float64))
        p.hits[layer] += int((selected & oracle_mask(a, k)).sum())

    def observe_routing(self, layer: int, experts: torch.Tensor, probs: torch.Tensor) -> None:
        """MoE router: tokens routed per expert, entropy (nats) of its distribution over experts (the
        recorder's probabilities, normalised to sum 1 as the Routing page does) summed over tokens."""
        p = probs.detach().double().cpu()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        self.p.entropy_sum[layer] += float(-torch.xlogy(p, p).sum())
        counts = torch.bincount(experts.detach().cpu().long().flatten(), minlength=self.p.routed.shape[1])
        self.p.routed[layer] += counts.numpy()

    def partial(self) -> Partial:
        p = self.p
        n = self.cf_rows.size
        order = np.argsort(self.hash[self.cf_rows], kind="stable")
        rows = self.cf_rows[order]
        p.cf_hash[:n], p.cf_doc[:n], p.cf_pos[:n] = self.hash[rows], self.doc[rows], self.pos[rows]
        p.cf_bits[:n] = np.packbits(self.cf_bits[torch.from_numpy(order)].numpy(), axis=-1)
        return p

    def _top(self, layer: int, cols: slice, rows: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> None:
        """Per unit, the TOP largest |h| of this call (ties to the lower doc, pos), merged into the partial."""
        t = a.topk(min(TOP, a.shape[0]), dim=0).values[-1]                  # [d]
        r, u = ((a >= t) & (a > 0)).nonzero(as_tuple=True)
        key, val = a[r, u].double().numpy(), h[r, u].double().numpy()
        doc, pos, u = self.doc[rows[r].numpy()], self.pos[rows[r].numpy()], u.numpy()
        order = np.lexsort((pos, doc, -key, u))
        slot = _rank(u[order])
        keep = order[slot < TOP]
        d = a.shape[1]
        new = [np.full((d, TOP), -1.0), np.zeros((d, TOP)), np.full((d, TOP), EMPTY), np.full((d, TOP), EMPTY)]
        for arr, src in zip(new, (key, val, doc, pos)):
            arr[u[keep], slot[slot < TOP]] = src[keep]
        p = self.p
        old = [p.top_key[layer, cols], p.top_val[layer, cols], p.top_doc[layer, cols], p.top_pos[layer, cols]]
        for arr, merged in zip(old, merge_top(old, new)):
            arr[...] = merged

    def _samples(self, layer: int, cols: slice, rows: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> None:
        """Per unit and |h| bin, the SAMPLES hash-sampled tokens of this call with the smallest hash."""
        cand = self.sampled[rows]
        if not bool(cand.any()):
            return
        sub_rows = rows[cand].numpy()
        hashes = self.hash[sub_rows]
        by_hash = torch.from_numpy(np.argsort(np.argsort(hashes, kind="stable"), kind="stable"))   # [m] rank
        sub, m = h[cand], len(sub_rows)
        nb = self.layout.sample_bins
        b = torch.bucketize(sub.abs(), self.sample_edges, right=True)                     # [m, d]
        key = (torch.arange(sub.shape[1]) * nb + b) * m + by_hash[:, None]                # unit, bin, hash
        key = np.sort(key[sub != 0].numpy())
        group, r_hash = key // m, key % m
        slot = _rank(group)
        keep = slot < SAMPLES
        u, b, r = group[keep] // nb, group[keep] % nb, np.argsort(by_hash.numpy())[r_hash[keep]]
        d = a.shape[1]
        new = [np.full((d, nb, SAMPLES), EMPTY), np.zeros((d, nb, SAMPLES)), np.zeros((d, nb, SAMPLES), np.int64),
               np.zeros((d, nb, SAMPLES), np.int64)]
        vals = sub.numpy()[r, u].astype(np.float64)
        for arr, src in zip(new, (hashes[r], vals, self.doc[sub_rows[r]], self.pos[sub_rows[r]])):
            arr[u, b, slot[keep]] = src
        p = self.p
        old = [p.smp_hash[layer, cols], p.smp_val[layer, cols], p.smp_doc[layer, cols], p.smp_pos[layer, cols]]
        for arr, merged in zip(old, merge_smallest(old, new)):
            arr[...] = merged


def _rank(groups: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal values (groups sorted)."""
    if groups.size == 0:
        return groups
    start = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
    return np.arange(groups.size) - np.repeat(start, np.diff(np.r_[start, groups.size]))
