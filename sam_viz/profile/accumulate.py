"""One shard's statistics, from the activations h of each MLP call (torch in, a stats.Partial out).

`ShardStats.observe` takes the dense pass's h of one layer (of one expert for MoE) on some rows of
the shard: oracle firing (the k = round(density * d_ff) largest |h| per token, ties to the lower
index, as sam_viz.sparse_ops.policy.topk_indices; and h > 0 for ReLU), sums, maxima, the histogram, top
examples, quantile-sample candidates and co-firing bits. `observe_policy` takes the policy's
selection on the same kind of call: selection counts, mass kept, recall and precision against the
oracle of the h it was given. Nothing here keeps h past the call.
"""
from __future__ import annotations

import numpy as np
import torch

from .stats import (COFIRE, EMPTY, HIST_EDGES, SAMPLE_EDGES, SAMPLE_RATE, SAMPLES, TOP, Layout, Partial,
                    merge_smallest, merge_top, sample_hash, token_hash)

_SAMPLE_LIMIT = (1 << 63) // SAMPLE_RATE
_LEAST = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))         # the least float32 > 0
_POS_EDGES = [e for e in HIST_EDGES if e > 0]
_EXP_LO = int(np.log2(_POS_EDGES[0])) + 127                 # biased float32 exponent of the first edge > 0


def oracle_pairs(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d] |h| -> (rows, cols) of the k largest per row, ties to the lower index (topk_indices'
    set), as n * k flat index pairs. One unsorted topk of k + 1: a row whose k-th and (k+1)-th
    values differ has its set in the topk; only rows with a tie there are resolved on the full row."""
    n, d = a.shape
    if k >= d:
        return torch.arange(n).repeat_interleave(d), torch.arange(d).repeat(n)
    top = a.topk(k + 1, dim=1, sorted=False)
    low = top.values.topk(2, dim=1, largest=False)                       # (k+1)-th, k-th largest
    tied = low.values[:, 0] == low.values[:, 1]
    keep = torch.ones(n, k + 1, dtype=torch.bool)
    keep[torch.arange(n), low.indices[:, 0]] = False
    cols = top.indices[keep].view(n, k)
    rows = torch.arange(n)[:, None].expand(n, k)
    if not bool(tied.any()):
        return rows.reshape(-1), cols.reshape(-1)
    ok, bad = (~tied).nonzero().flatten(), tied.nonzero().flatten()
    sub, t = a[bad], low.values[bad, 1:]
    above, tie = sub > t, sub == t
    need = k - above.sum(1, keepdim=True)
    r, c = (above | (tie & (tie.cumsum(1) <= need))).nonzero(as_tuple=True)
    return torch.cat([rows[ok].reshape(-1), bad[r]]), torch.cat([cols[ok].reshape(-1), c])


def oracle_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """[n, d] |h| -> [n, d] bool: the k largest per row, ties to the lower index (topk_indices' set)."""
    mask = torch.zeros(a.shape, dtype=torch.bool)
    mask[oracle_pairs(a, k)] = True
    return mask


def hist_counts(h: torch.Tensor, a: torch.Tensor) -> np.ndarray:
    """[n, d] h (float32) and |h| -> [d, bins] counts of h in HIST_EDGES' bins (as torch.bucketize
    with right=True), from float32 bits: the edges are 0 and ±2^j, so a bin is an exponent. |h|'s
    bits shifted right by 23 are its biased exponent; for h < 0 the bits less one are, so that
    -2^j (mantissa 0) counts with the magnitudes in (2^(j-1), 2^j), in the bin [-2^j, -2^(j-1))."""
    n, d = h.shape
    neg = h.numpy() < 0
    v = (a.numpy().view(np.int32) - neg) >> 23
    np.clip(v, _EXP_LO - 1, _EXP_LO - 1 + len(_POS_EDGES), out=v)
    v -= _EXP_LO - 1                                                      # 0 .. 18: positive edges <= |h|
    mid = len(_POS_EDGES)
    idx = np.where(neg, mid - v, mid + 1 + v) + (np.arange(d, dtype=np.int32) * (len(HIST_EDGES) + 1))
    return np.bincount(idx.ravel(), minlength=d * (len(HIST_EDGES) + 1)).reshape(d, -1)


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
        this pass is the oracle top-k / every unit. The oracle is kept as its n * k (row, unit)
        pairs, so counts are bincounts of k entries per row rather than sums over all d."""
        h = h.detach().float().cpu().contiguous()
        rows = rows.detach().cpu().long()
        n, d = h.shape
        a = h.abs()
        r, c = oracle_pairs(a, k)
        kept = a[r, c]                                                    # |h| of the oracle pairs
        fr, fc = (r, c) if not relu else (r[h[r, c] > 0], c[h[r, c] > 0])
        p, cols = self.p, slice(offset, offset + d)
        p.tokens[layer, cols] += n
        fired = np.bincount(fc.numpy(), minlength=d)
        p.fire[layer, cols] += fired
        col_abs = a.sum(0)                                                # [d] float32, per call
        p.sum_abs[layer, cols] += col_abs.double().numpy()
        col_max = a.amax(0)
        p.max_abs[layer, cols] = np.maximum(p.max_abs[layer, cols], col_max.double().numpy())
        p.possible[layer] += n * d
        p.hist[layer, cols] += hist_counts(h, a)
        self._top(layer, cols, rows, h, a, col_max)
        self._samples(layer, cols, rows, h)
        slot = self.cf_slot[rows[fr]]
        mine = slot >= 0
        self.cf_bits[slot[mine], layer, offset + fc[mine]] = True
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
                p.select[layer, cols] += fired if not relu else np.bincount(c.numpy(), minlength=d)
                p.selected[layer] += n * k
                p.mass_kept[layer] += float(kept.sum(dtype=torch.float64))

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

    def _top(self, layer: int, cols: slice, rows: torch.Tensor, h: torch.Tensor, a: torch.Tensor,
             col_max: torch.Tensor) -> None:
        """Per unit, the TOP largest |h| of this call (ties to the lower doc, pos), merged into the
        partial. Only entries >= the unit's current TOP-th key can enter it: where the list is full
        that bound is the candidate filter; elsewhere it is this call's TOP-th largest |h|."""
        p = self.p
        floor = torch.from_numpy(p.top_key[layer, cols, -1].copy())                   # -1: not full
        live = (col_max >= floor) & (col_max > 0)
        if not bool(live.any()):
            return
        units = live.nonzero().flatten()
        every = units.numel() == a.shape[1]
        sub, floor = (a, floor) if every else (a[:, units], floor[units])
        open_ = floor < 0
        if bool(open_.any()):
            floor[open_] = sub[:, open_].topk(min(TOP, sub.shape[0]), dim=0).values[-1]
        r, j = (sub >= floor.clamp_min(_LEAST)).nonzero(as_tuple=True)      # and |h| > 0
        u = j if every else units[j]
        key, val = a[r, u].numpy(), h[r, u].numpy()
        doc, pos, u = self.doc[rows[r].numpy()], self.pos[rows[r].numpy()], u.numpy()
        order = np.lexsort((pos, doc, -key, u))
        slot = _rank(u[order])
        keep = order[slot < TOP]
        touched, where = np.unique(u[keep], return_inverse=True)
        g = touched.size
        new = [np.full((g, TOP), -1.0, np.float32), np.zeros((g, TOP), np.float32), np.full((g, TOP), EMPTY),
               np.full((g, TOP), EMPTY)]
        for arr, src in zip(new, (key, val, doc, pos)):
            arr[where, slot[slot < TOP]] = src[keep]
        at = touched + cols.start
        old = [p.top_key[layer, at], p.top_val[layer, at], p.top_doc[layer, at], p.top_pos[layer, at]]
        for arr, merged in zip((p.top_key, p.top_val, p.top_doc, p.top_pos), merge_top(old, new)):
            arr[layer, at] = merged

    def _samples(self, layer: int, cols: slice, rows: torch.Tensor, h: torch.Tensor) -> None:
        """Per unit and |h| bin, the SAMPLES hash-sampled tokens of this call with the smallest hash;
        only the (unit, bin) lists that get a candidate are merged."""
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
        group, slot = group[keep], slot[keep]
        u, r = group // nb, np.argsort(by_hash.numpy())[r_hash[keep]]
        touched, where = np.unique(group, return_inverse=True)
        g = touched.size
        new = [np.full((g, SAMPLES), EMPTY), np.zeros((g, SAMPLES), np.float32), np.full((g, SAMPLES), EMPTY),
               np.zeros((g, SAMPLES), np.int64)]
        vals = sub.numpy()[r, u]
        for arr, src in zip(new, (hashes[r], vals, self.doc[sub_rows[r]], self.pos[sub_rows[r]])):
            arr[where, slot] = src
        p = self.p
        at_u, at_b = touched // nb + cols.start, touched % nb
        old = [x[layer, at_u, at_b] for x in (p.smp_val, p.smp_doc, p.smp_pos)]
        merged = merge_smallest([sample_hash(old[1], old[2]), *old], new)[1:]
        for arr, m in zip((p.smp_val, p.smp_doc, p.smp_pos), merged):
            arr[layer, at_u, at_b] = m


def _rank(groups: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal values (groups sorted)."""
    if groups.size == 0:
        return groups
    start = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
    return np.arange(groups.size) - np.repeat(start, np.diff(np.r_[start, groups.size]))
