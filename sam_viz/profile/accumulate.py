"""One shard's statistics, from the activations h of each MLP call (torch in, a stats.Partial out).

`ShardStats.observe` takes the dense pass's h of one layer (of one expert for MoE) on some rows of
the shard: oracle firing (the k = round(density * d_ff) largest |h| per token, ties to the lower
index, as sam_viz.sparse_ops.policy.topk_indices; and h > 0 for ReLU), sums, maxima, the histogram, top
examples, quantile-sample candidates and co-firing bits. `observe_policy` takes the policy's
selection on the same kind of call: selection counts, mass kept, recall and precision against the
oracle of the h it was given. Nothing here keeps h past the call. The per-call work is numpy on
whole arrays (one thread, no loop over tokens or units); sums of |h| per unit are float64.
"""
from __future__ import annotations

import numpy as np
import torch

from .stats import (COFIRE, EMPTY, HIST_EDGES, SAMPLE_EDGES, SAMPLE_RATE, SAMPLES, TOP, Layout, Partial,
                    merge_smallest, merge_top, sample_hash, token_hash)

_SAMPLE_LIMIT = (1 << 63) // SAMPLE_RATE
_LEAST = np.nextafter(np.float32(0), np.float32(1))                   # the least float32 > 0
_POS_EDGES = [e for e in HIST_EDGES if e > 0]
_EXP_LO = int(np.log2(_POS_EDGES[0])) + 127                 # biased float32 exponent of the first edge > 0


def oracle(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, d] |h| (float32) -> ([n, d] bool: the k largest per row, ties to the lower index, as
    sam_viz.sparse_ops.policy.topk_indices; [n, k] their values, in no order). One np.partition finds each
    row's k-th largest value t; `a >= t` is the set unless the row has more than one entry equal to
    t, and only such rows are resolved (the first of the ties, by index, up to k)."""
    n, d = a.shape
    if k >= d:
        return np.ones((n, d), dtype=bool), a
    if k <= 0:
        return np.zeros((n, d), dtype=bool), a[:, :0]
    part = np.partition(a, d - k, axis=1)
    t = part[:, d - k, None]                                             # [n, 1] k-th largest
    mask = a >= t
    bad = np.flatnonzero(np.count_nonzero(mask, axis=1) != k)           # ties at t
    if bad.size:
        sub, tb = a[bad], t[bad]
        above, tie = sub > tb, sub == tb
        need = k - np.count_nonzero(above, axis=1)[:, None]
        mask[bad] = above | (tie & (np.cumsum(tie, axis=1) <= need))
    return mask, part[:, d - k:]


def oracle_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """[n, d] |h| -> [n, d] bool: the k largest per row, ties to the lower index (topk_indices' set)."""
    return torch.from_numpy(oracle(np.ascontiguousarray(a.detach().float().cpu().numpy()), k)[0])


def _hist_lut() -> np.ndarray:
    """Bin of HIST_EDGES for each 9-bit code (sign, biased float32 exponent) that hist_counts makes."""
    code = np.arange(512)
    v = np.clip(code & 255, _EXP_LO - 1, _EXP_LO - 1 + len(_POS_EDGES)) - (_EXP_LO - 1)   # positive edges <= |h|
    mid = len(_POS_EDGES)
    return np.where(code >= 256, mid - v, mid + 1 + v).astype(np.intp)


_HIST_LUT = _hist_lut()
_BLOCK = 1 << 18                             # values per block of rows in hist_counts


def hist_counts(h) -> np.ndarray:
    """[n, d] h (float32) -> [d, bins] counts of h in HIST_EDGES' bins (as np.searchsorted on them,
    side right), from float32 bits: the edges are 0 and ±2^j, so a bin is an exponent. h + 0 turns
    -0.0 into 0.0; then the bits shifted right by 23 are the sign and biased exponent, and for h < 0
    the bits less one are, so that -2^j (mantissa 0) counts with the magnitudes in (2^(j-1), 2^j),
    in the bin [-2^j, -2^(j-1)). A table maps those 512 codes to bins (exponents out of range clip).
    In blocks of rows of about 2^18 values, which stay in cache between the passes (twice as fast)."""
    h = np.asarray(h, dtype=np.float32)
    n, d = h.shape
    bins = len(HIST_EDGES) + 1
    base = np.arange(d, dtype=np.intp) * bins
    out = np.zeros(d * bins, dtype=np.int64)
    step = max(1, _BLOCK // max(d, 1))
    for start in range(0, n, step):
        u = (h[start:start + step] + np.float32(0.0)).view(np.uint32)
        code = u - (u >> 31)
        code >>= 23
        idx = _HIST_LUT[code]
        idx += base
        out += np.bincount(idx.ravel(), minlength=d * bins)
    return out.reshape(d, bins)


class ShardStats:
    """Accumulates one shard; `partial()` returns its stats.Partial."""

    def __init__(self, layout: Layout, doc: np.ndarray, pos: np.ndarray):
        self.layout = layout
        self.p = Partial.empty(layout)
        self.doc, self.pos = doc.reshape(-1), pos.reshape(-1)            # [N] per flattened row
        self.hash = token_hash(self.doc, self.pos)
        self.sampled = self.hash < _SAMPLE_LIMIT
        keep = np.argsort(self.hash, kind="stable")[:COFIRE]              # this shard's co-firing tokens
        self.cf_rows = keep
        self.cf_slot = np.full(self.doc.size, -1, dtype=np.int64)
        self.cf_slot[keep] = np.arange(keep.size)
        self.cf_bits = np.zeros((keep.size, layout.n_layers, layout.units), dtype=bool)
        self.sample_edges = np.array(SAMPLE_EDGES, dtype=np.float32)

    def observe(self, layer: int, rows: torch.Tensor, h: torch.Tensor, offset: int, k: int, relu: bool,
                policy: str | None = None) -> None:
        """Dense h [n, d] of `rows` [n]. policy "topk" / "dense": also count its selection, which on
        this pass is the oracle top-k / every unit (its mass: the oracle's values, which ties at the
        k-th value do not change)."""
        h = h.detach().float().cpu().contiguous().numpy()
        rows = rows.detach().cpu().numpy().astype(np.int64, copy=False)
        n, d = h.shape
        a = np.abs(h)
        mask, kept = oracle(a, k)                                         # [n, d], [n, k]
        fire = mask & (h > 0) if relu else mask
        p, cols = self.p, slice(offset, offset + d)
        p.tokens[layer, cols] += n
        fired = fire.sum(0)
        p.fire[layer, cols] += fired
        col_abs = a.sum(0, dtype=np.float64)                              # [d]
        p.sum_abs[layer, cols] += col_abs
        col_max = a.max(0) if n else np.zeros(d, np.float32)
        p.max_abs[layer, cols] = np.maximum(p.max_abs[layer, cols], col_max)
        p.possible[layer] += n * d
        p.hist[layer, cols] += hist_counts(h)
        self._top(layer, cols, rows, h, a, col_max)
        self._samples(layer, cols, rows, h)
        slot = self.cf_slot[rows]
        mine = slot >= 0
        self.cf_bits[slot[mine], layer, cols] = fire[mine]
        if policy in ("topk", "dense"):
            total = float(col_abs.sum())
            p.mass_total[layer] += total
            p.oracle[layer] += n * k
            p.hits[layer] += n * k
            if policy == "dense":
                p.select[layer, cols] += n
                p.selected[layer] += n * d
                p.mass_kept[layer] += total
            else:
                p.select[layer, cols] += fired if not relu else mask.sum(0)
                p.selected[layer] += n * k
                p.mass_kept[layer] += float(kept.sum(dtype=np.float64))

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
        p.cf_bits[:n] = np.packbits(self.cf_bits[order], axis=-1)
        return p

    def _top(self, layer: int, cols: slice, rows: np.ndarray, h: np.ndarray, a: np.ndarray,
             col_max: np.ndarray) -> None:
        """Per unit, the TOP largest |h| (ties to the lower doc, pos) of this call and the partial's
        list. Only entries >= the unit's current TOP-th key can enter it: where the list is full
        that bound is the candidate filter; elsewhere it is this call's TOP-th largest |h|. The
        candidates and the touched units' lists are sorted together, by (unit, -|h|, doc, pos)."""
        p = self.p
        floor = p.top_key[layer, cols, -1].copy()                                    # -1: not full
        live = (col_max >= floor) & (col_max > 0)
        if not live.any():
            return
        open_ = np.flatnonzero(live & (floor < 0))
        if open_.size:
            n, m = a.shape[0], min(TOP, a.shape[0])
            sub = torch.from_numpy(a if open_.size == a.shape[1] else a[:, open_])
            sub = sub.t().contiguous().numpy()                       # [units, n]: torch's blocked transpose
            floor[open_] = np.partition(sub, n - m, axis=1)[:, n - m]
        bound = np.where(live, np.maximum(floor, _LEAST), np.inf).astype(np.float32)  # and |h| > 0
        r, u = np.nonzero(a >= bound)
        touched = np.flatnonzero(np.bincount(u, minlength=a.shape[1]))
        at = touched + cols.start
        old = [x[layer, at].ravel() for x in (p.top_key, p.top_val, p.top_doc, p.top_pos)]
        unit = np.concatenate([u, np.repeat(touched, TOP)])
        key, val = np.concatenate([a[r, u], old[0]]), np.concatenate([h[r, u], old[1]])
        doc, pos = np.concatenate([self.doc[rows[r]], old[2]]), np.concatenate([self.pos[rows[r]], old[3]])
        bits = np.where(key < 0, -1, key.view(np.int32)).astype(np.int64)          # |h| order; empty last
        order = np.lexsort((pos, doc, (unit.astype(np.int64) << 32) | (0x7FFFFFFF - bits)))
        keep = order[_rank(unit[order]) < TOP]                  # TOP per touched unit, in unit order
        for arr, src in zip((p.top_key, p.top_val, p.top_doc, p.top_pos), (key, val, doc, pos)):
            arr[layer, at] = src[keep].reshape(-1, TOP)

    def _samples(self, layer: int, cols: slice, rows: np.ndarray, h: np.ndarray) -> None:
        """Per unit and |h| bin, the SAMPLES hash-sampled tokens of this call with the smallest hash;
        only the (unit, bin) lists that get a candidate are merged."""
        cand = self.sampled[rows]
        if not cand.any():
            return
        sub_rows = rows[cand]
        hashes = self.hash[sub_rows]
        by_hash = np.argsort(np.argsort(hashes, kind="stable"), kind="stable")         # [m] rank
        sub, m = h[cand], len(sub_rows)
        nb = self.layout.sample_bins
        b = np.searchsorted(self.sample_edges, np.abs(sub), side="right")               # [m, d] bin
        key = (np.arange(sub.shape[1]) * nb + b) * m + by_hash[:, None]                 # unit, bin, hash
        key = np.sort(key[sub != 0])
        group, r_hash = key // m, key % m
        slot = _rank(group)
        keep = slot < SAMPLES
        group, slot = group[keep], slot[keep]
        u, r = group // nb, np.argsort(by_hash)[r_hash[keep]]
        touched, where = np.unique(group, return_inverse=True)
        g = touched.size
        new = [np.full((g, SAMPLES), EMPTY), np.zeros((g, SAMPLES), np.float32), np.full((g, SAMPLES), EMPTY),
               np.zeros((g, SAMPLES), np.int64)]
        vals = sub[r, u]
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
