"""Partial statistics of a corpus pass: values that merge exactly, in any order (as SAEDashboard's
running sums): counts and sums add, maxima take the max, and every bounded list keeps the first
entries of one fixed total order, so the list of a union is the list of the lists' union.

- top examples: per (layer, unit) the TOP entries with the largest |h|, ties to the lower (doc, pos);
- quantile samples: per (layer, unit) and fixed log-spaced bin of |h|, the SAMPLES tokens with the
  smallest hash(doc, pos), among the tokens whose hash falls in a fixed 1/SAMPLE_RATE share
  (bands relative to the neuron's max |h| are only known at the end; they are cut from these);
  the hash is not stored: `sample_hash` recomputes it from (doc, pos) when lists are merged;
- co-firing: the COFIRE tokens with the smallest hash(doc, pos), with their oracle firing bits.

Memory is bounded by the model's size, never the corpus': every array below has a fixed shape
(`Layout`), whatever the number of tokens merged in. No engine is known here.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np

TOP = 20
SAMPLES = 4                                  # per (unit, |h| bin)
SAMPLE_RATE = 32                             # a token is a quantile-sample candidate if its hash < 2^63 / 32
COFIRE = 2048                                # tokens kept for co-firing
HIST_LO, HIST_HI = -10, 7                    # histogram edges: 0 and ±2^j, j in [-10, 7] (~1e-3 .. 128)
HIST_EDGES = tuple([-(2.0 ** j) for j in range(HIST_HI, HIST_LO - 1, -1)] + [0.0]
                   + [2.0 ** j for j in range(HIST_LO, HIST_HI + 1)])
SAMPLE_EDGES = tuple(10 ** (k / 4) for k in range(-12, 13))   # |h| bins: 1e-3 .. 1e3, ratio 1.78
EMPTY = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Layout:
    n_layers: int
    units: int                               # per layer (n_experts * d_ff for MoE)
    n_experts: int = 0

    @property
    def bins(self) -> int:
        return len(HIST_EDGES) + 1

    @property
    def sample_bins(self) -> int:
        return len(SAMPLE_EDGES) + 1


def token_hash(doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """A fixed 63-bit hash of (doc, pos) (splitmix64), as int64 >= 0."""
    x = (doc.astype(np.uint64) << np.uint64(32)) ^ pos.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((x ^ (x >> np.uint64(31))) >> np.uint64(1)).astype(np.int64)


def sample_hash(doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """token_hash of quantile-sample slots; EMPTY where the slot is empty (doc == EMPTY)."""
    return np.where(doc == EMPTY, EMPTY, token_hash(doc, pos))


@dataclass
class Partial:
    """Statistics of some tokens of a corpus. [L, U] per unit, [L] per layer; see schema.md."""
    tokens: np.ndarray           # [L, U] i64 tokens on which the unit was computed
    fire: np.ndarray             # [L, U] i64 in the oracle top-k (and h > 0 for ReLU)
    select: np.ndarray           # [L, U] i64 selected by the policy
    sum_abs: np.ndarray          # [L, U] f64
    max_abs: np.ndarray          # [L, U] f64
    hist: np.ndarray             # [L, U, bins] i64 counts of h in HIST_EDGES' bins
    top_key: np.ndarray          # [L, U, TOP] f32 |h| (-1: empty slot); h is float32, so exact
    top_val: np.ndarray          # [L, U, TOP] f32 h
    top_doc: np.ndarray          # [L, U, TOP] i64 (EMPTY: empty slot)
    top_pos: np.ndarray          # [L, U, TOP] i64
    smp_val: np.ndarray          # [L, U, sample_bins, SAMPLES] f32 h
    smp_doc: np.ndarray          # [L, U, sample_bins, SAMPLES] i64 (EMPTY: empty slot)
    smp_pos: np.ndarray          # [L, U, sample_bins, SAMPLES] i64
    layer_tokens: np.ndarray     # [L] i64 token positions seen
    possible: np.ndarray         # [L] i64 unit evaluations the dense model makes
    selected: np.ndarray         # [L] i64 unit evaluations the policy makes
    oracle: np.ndarray           # [L] i64 oracle top-k sizes, summed over tokens
    hits: np.ndarray             # [L] i64 selected units in the oracle top-k
    mass_kept: np.ndarray        # [L] f64 sum |h| over the selected units
    mass_total: np.ndarray       # [L] f64 sum |h| over all units
    entropy_sum: np.ndarray      # [L] f64 router entropy summed over tokens (MoE)
    routed: np.ndarray           # [L, max(E, 1)] i64 tokens routed to each expert (MoE)
    cf_hash: np.ndarray          # [COFIRE] i64 (EMPTY: empty slot), ascending
    cf_doc: np.ndarray           # [COFIRE] i64
    cf_pos: np.ndarray           # [COFIRE] i64
    cf_bits: np.ndarray          # [COFIRE, L, ceil(U / 8)] u8 packed oracle firing bits

    @classmethod
    def empty(cls, layout: Layout) -> "Partial":
        L, U, B, S = layout.n_layers, layout.units, layout.bins, layout.sample_bins
        i64 = lambda *s, v=0: np.full(s, v, dtype=np.int64)              # noqa: E731
        f64 = lambda *s, v=0.0: np.full(s, v, dtype=np.float64)          # noqa: E731
        f32 = lambda *s, v=0.0: np.full(s, v, dtype=np.float32)          # noqa: E731
        return cls(i64(L, U), i64(L, U), i64(L, U), f64(L, U), f64(L, U), i64(L, U, B),
                   f32(L, U, TOP, v=-1.0), f32(L, U, TOP), i64(L, U, TOP, v=EMPTY), i64(L, U, TOP, v=EMPTY),
                   f32(L, U, S, SAMPLES), i64(L, U, S, SAMPLES, v=EMPTY), i64(L, U, S, SAMPLES),
                   i64(L), i64(L), i64(L), i64(L), i64(L), f64(L), f64(L), f64(L),
                   i64(L, max(layout.n_experts, 1)), i64(COFIRE, v=EMPTY), i64(COFIRE), i64(COFIRE),
                   np.zeros((COFIRE, L, -(-U // 8)), dtype=np.uint8))

    def merge(self, other: "Partial") -> "Partial":
        """The statistics of both token sets (disjoint); exact, associative and commutative."""
        out = {}
        for f in fields(self):
            if f.name.startswith(("top_", "smp_", "cf_")):
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = np.maximum(a, b) if f.name == "max_abs" else a + b
        out.update(zip(("top_key", "top_val", "top_doc", "top_pos"),
                       merge_top([self.top_key, self.top_val, self.top_doc, self.top_pos],
                                 [other.top_key, other.top_val, other.top_doc, other.top_pos])))
        out.update(zip(("smp_val", "smp_doc", "smp_pos"),
                       merge_smallest([sample_hash(self.smp_doc, self.smp_pos), self.smp_val, self.smp_doc,
                                       self.smp_pos],
                                      [sample_hash(other.smp_doc, other.smp_pos), other.smp_val, other.smp_doc,
                                       other.smp_pos])[1:]))
        out.update(zip(("cf_hash", "cf_doc", "cf_pos", "cf_bits"),
                       merge_smallest([self.cf_hash, self.cf_doc, self.cf_pos, self.cf_bits],
                                      [other.cf_hash, other.cf_doc, other.cf_pos, other.cf_bits], axis=0)))
        return Partial(**out)

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **{f.name: getattr(self, f.name) for f in fields(self)})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Partial":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if set(z.files) != {f.name for f in fields(cls)}:       # another version's state (a checkpoint)
                raise ValueError("partial statistics of another layout version")
            return cls(**{f.name: z[f.name] for f in fields(cls)})


def merge_top(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """[key, val, doc, pos] lists of [..., K]: the K entries of both with the largest key, ties to
    the lower (doc, pos)."""
    cat = [np.concatenate([x, y], axis=-1) for x, y in zip(a, b)]
    order = np.lexsort((cat[3], cat[2], -cat[0]), axis=-1)[..., :a[0].shape[-1]]
    return [np.take_along_axis(x, order, axis=-1) for x in cat]


def merge_smallest(a: list[np.ndarray], b: list[np.ndarray], axis: int = -1) -> list[np.ndarray]:
    """[hash, ...] lists: the entries of both with the smallest hash (a total order: a token has one
    hash, and a token is in one side only), as many as one side holds, along `axis`."""
    cat = [np.concatenate([x, y], axis=axis) for x, y in zip(a, b)]
    n = a[0].shape[axis]
    if axis == 0:
        order = np.argsort(cat[0], kind="stable")[:n]
        return [x[order] for x in cat]
    order = np.argsort(cat[0], axis=-1, kind="stable")[..., :n]
    return [np.take_along_axis(x, order, axis=-1) for x in cat]


def sum_partials(parts) -> Partial:
    """Merge an iterable of partials (at least one) left to right."""
    it = iter(parts)
    total = next(it)
    for p in it:
        total = total.merge(p)
    return total
