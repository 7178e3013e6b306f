"""Reading corpus profiles (issue 14): the manifest and Parquet tables that a `profile` run wrote under
SAM_VIZ_PROFILE_DIR/<id>/ (see build_profile), and the views the Corpus page draws from them:
PowerInfer's hot-neuron curve (Song et al. 2023, Fig. 4: the share of neurons that covers X% of all
activations), the layers x units firing-frequency matrix sorted by frequency, dead and always-on
counts, and one neuron's page as Neuronpedia and SAEDashboard show it (top contexts, quantile samples,
histogram, logit effects, correlated units). Read only: no model, no Streamlit. An id is checked
against its pattern before any path is built, and no file outside the root is read.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from sam_viz.models.errors import InputError
from sam_viz.models.token_text import LEGACY, VISIBLE

ID_PATTERN = re.compile(r"[0-9a-f]{12}")
DEFAULT_ROOT = "profiles"
MAX_COLUMNS = 512          # firing matrix: columns sent to the browser at most
TOP_CORRELATED = 10
REQUIRED = ("model", "kind", "n_layers", "d_ff", "units", "settings")
TABLES = {
    "neurons": ("layer", "neuron", "tokens", "fire_count", "select_count", "sum_abs", "max_abs", "hist"),
    "layers": ("layer", "tokens", "density", "recall", "precision", "mass_kept"),
    "examples": ("layer", "neuron", "band", "rank", "value", "doc", "pos", "tokens", "focus"),
    "cofire": ("layer", "a", "b", "both", "tokens"),
    "logits": ("layer", "neuron", "sign", "rank", "token", "value"),
    "experts": ("layer", "expert", "tokens_routed", "share"),
}
OPTIONAL = ("cofire", "logits", "experts")       # a profile may lack these (encoders, dense models)
_SPECIAL = re.compile(r"\[[A-Z]+\]|<\|[^|]*\|>|</?s>")
_STAND_INS = {v: k for marks in (VISIBLE, LEGACY) for k, v in marks.items()} | {"▁": " "}


def profile_root(root: str | os.PathLike | None = None) -> Path:
    """The folder profiles live in: `root`, else SAM_VIZ_PROFILE_DIR, else ./profiles."""
    return Path(root or os.environ.get("SAM_VIZ_PROFILE_DIR") or DEFAULT_ROOT)


def list_profiles(root=None) -> list[dict]:
    """The manifests of the complete profiles under the root, newest first; a folder without a
    readable manifest (a profile being written, a stray folder) is not listed."""
    base = profile_root(root)
    if not base.is_dir():
        return []
    out = []
    for child in base.iterdir():
        if ID_PATTERN.fullmatch(child.name) and _inside(child, base):
            try:
                out.append(_manifest(child, child.name))
            except InputError:
                continue
    return sorted(out, key=lambda m: str(m.get("created", "")), reverse=True)


def open_profile(profile_id: str, root=None) -> "Profile":
    """The profile with this id; InputError (one sentence) for an id that is not one, or unknown here."""
    shown = str(profile_id)[:40]
    if not isinstance(profile_id, str) or not ID_PATTERN.fullmatch(profile_id):
        raise InputError(f"'{shown}' is not a profile id: an id is 12 characters from 0-9 and a-f.")
    base = profile_root(root)
    path = base / profile_id
    if not (path / "manifest.json").is_file() or not _inside(path, base):
        raise InputError(f"There is no profile with id '{profile_id}' in {base}.")
    return Profile(path.resolve(), _manifest(path, profile_id))


def _inside(path: Path, base: Path) -> bool:
    """True when `path`, links followed, lies inside `base`, links followed."""
    return path.resolve().is_relative_to(base.resolve()) and path.resolve() != base.resolve()


def _manifest(path: Path, profile_id: str) -> dict:
    file = path / "manifest.json"
    try:
        if not _inside(file, path):
            raise ValueError("it leads out of the profile's folder")
        manifest = json.loads(file.read_text())
        missing = [k for k in REQUIRED if k not in manifest] if isinstance(manifest, dict) else ["all"]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        if not all(isinstance(manifest[k], int) and manifest[k] > 0 for k in ("n_layers", "d_ff", "units")):
            raise ValueError("n_layers, d_ff and units must be positive integers")
        if not isinstance(manifest["settings"], dict) or not {"policy", "density"} <= set(manifest["settings"]):
            raise ValueError("its settings lack the policy or the density")
    except (OSError, ValueError) as exc:
        raise InputError(f"Profile '{profile_id}' cannot be read: its manifest.json is damaged ({exc}).") from None
    return {**manifest, "id": profile_id}


@dataclass(frozen=True)
class HotCurve:
    """Units sorted by fire_count, most first: after the first i units (share units[i]), the share
    selections[i] of all oracle selections is covered. Both start at 0 and end at 1."""
    units: np.ndarray           # [n + 1]
    selections: np.ndarray      # [n + 1]

    def covering(self, share: float) -> float:
        """The smallest share of units that covers at least `share` of the selections."""
        i = int(np.searchsorted(self.selections, share - 1e-12, side="left"))
        return float(self.units[min(i, len(self.units) - 1)])


@dataclass(frozen=True)
class FiringMatrix:
    """[n_layers, columns] firing frequency, each layer's units sorted most frequent first; when a
    layer has more units than columns, a column is the mean of a block of `block` consecutive ranks."""
    values: np.ndarray
    units: int
    block: int


@dataclass(frozen=True)
class NeuronView:
    """One unit over the corpus: its counts, activation statistics, examples, logit effects and the
    units that fire with it."""
    layer: int
    unit: int
    expert: int | None          # MoE: the expert the unit belongs to
    tokens: int                 # tokens on which the unit was computed
    fire_count: int             # in the oracle top-k at the profile's density
    select_count: int           # selected by the profile's policy
    mean_abs: float
    max_abs: float
    hist: list[int]             # len(hist_edges) + 1 counts of h
    hist_edges: list[float]
    examples: pd.DataFrame      # band ("top", "q0".."q4"), rank, value, doc, pos, tokens, focus
    logits: pd.DataFrame | None     # sign, rank, token, value; None for encoders
    correlated: pd.DataFrame | None  # unit, both, tokens, phi; None when the unit was not sampled
    cofire_note: str

    @property
    def fire_freq(self) -> float:
        return self.fire_count / self.tokens if self.tokens else 0.0

    @property
    def select_freq(self) -> float:
        return self.select_count / self.tokens if self.tokens else 0.0

    def band(self, name: str) -> pd.DataFrame:
        return self.examples[self.examples["band"] == name].sort_values("rank")


class Profile:
    """A profile on disk: its manifest and the views the Corpus page shows; tables read on first use."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.id = manifest["id"]
        self.n_layers, self.units = int(manifest["n_layers"]), int(manifest["units"])
        self.d_ff, self.n_experts = int(manifest["d_ff"]), int(manifest.get("n_experts") or 0)

    def table(self, name: str, filters: list | None = None) -> pd.DataFrame | None:
        """One of the profile's tables (the rows that pass pyarrow `filters`, if given), checked for
        its columns; None for an optional table the profile lacks."""
        file = self.path / f"{name}.parquet"
        if name in OPTIONAL and not file.exists():
            return None
        if not _inside(file, self.path):
            raise self._damaged(name, "it leads out of the profile's folder")
        try:
            df = pd.read_parquet(file, filters=filters)
        except Exception:  # noqa: BLE001 - pyarrow raises many types for a damaged or missing file
            raise self._damaged(name, "it is not a readable Parquet table") from None
        missing = [c for c in TABLES[name] if c not in df.columns]
        if missing:
            raise self._damaged(name, f"it lacks the column {', '.join(missing)}")
        return df

    def _damaged(self, name: str, why: str) -> InputError:
        return InputError(f"Profile '{self.id}' cannot be read: its {name}.parquet is damaged ({why}).")

    @cached_property
    def _neurons(self) -> pd.DataFrame:
        return self.table("neurons")

    @cached_property
    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        """([n_layers, units] fire_count, [n_layers, units] tokens); a unit without a row counts 0."""
        df = self._neurons
        ok = df["layer"].between(0, self.n_layers - 1) & df["neuron"].between(0, self.units - 1)
        fire = np.zeros((self.n_layers, self.units), dtype=np.int64)
        seen = np.zeros((self.n_layers, self.units), dtype=np.int64)
        fire[df["layer"][ok], df["neuron"][ok]] = df["fire_count"][ok]
        seen[df["layer"][ok], df["neuron"][ok]] = df["tokens"][ok]
        return fire, seen

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def hot_curve(self, layer: int | None = None) -> HotCurve:
        """PowerInfer's Fig. 4 for one layer, or model-wide (all layers' units pooled) for None."""
        fire = self._counts[0] if layer is None else self._counts[0][[self._layer(layer)]]
        counts = np.sort(fire.ravel())[::-1]
        total = counts.sum()
        cum = np.concatenate([[0], np.cumsum(counts)]) / (total if total else 1)
        return HotCurve(np.arange(len(counts) + 1) / len(counts), cum)

    def frequency(self) -> np.ndarray:
        """[n_layers, units] share of its tokens on which each unit fired (0 for a unit never computed)."""
        fire, seen = self._counts
        return np.divide(fire, seen, out=np.zeros(fire.shape), where=seen > 0)

    def firing_matrix(self, max_columns: int = MAX_COLUMNS) -> FiringMatrix:
        """Each layer's frequencies sorted descending, in at most `max_columns` columns: blocks of
        ceil(units / max_columns) consecutive ranks averaged (the last block may be shorter)."""
        freq = -np.sort(-self.frequency(), axis=1)
        block = math.ceil(self.units / max_columns)
        starts = np.arange(0, self.units, block)
        sums = np.add.reduceat(freq, starts, axis=1)
        sizes = np.diff(np.append(starts, self.units))
        return FiringMatrix(sums / sizes, self.units, block)

    def layer_table(self) -> pd.DataFrame:
        """One row per layer: the policy's density, recall, precision and mass kept against the oracle
        (as the profile stored them), and the dead and always-on units counted from neurons.parquet."""
        fire, seen = self._counts
        df = self.table("layers").sort_values("layer").reset_index(drop=True)
        df["dead"] = df["layer"].map(lambda l: int((fire[l] == 0).sum()) if 0 <= l < self.n_layers else 0)
        df["always_on"] = df["layer"].map(
            lambda l: int(((fire[l] == seen[l]) & (seen[l] > 0)).sum()) if 0 <= l < self.n_layers else 0)
        return df

    def _layer(self, layer) -> int:
        if not 0 <= int(layer) < self.n_layers:
            raise InputError(f"Layer {layer} is out of range: this profile has {self.n_layers} layers "
                             f"(0 to {self.n_layers - 1}).")
        return int(layer)

    def _unit(self, unit) -> int:
        if not 0 <= int(unit) < self.units:
            raise InputError(f"Neuron {unit} is out of range: this profile has {self.units} neurons per "
                             f"layer (0 to {self.units - 1}).")
        return int(unit)

    def neuron(self, layer: int, unit: int) -> NeuronView:
        """Everything the neuron view shows of one unit; InputError for a layer or unit out of range."""
        layer, unit = self._layer(layer), self._unit(unit)
        df = self._neurons
        rows = df[(df["layer"] == layer) & (df["neuron"] == unit)]
        edges = [float(e) for e in self.manifest.get("hist_edges", [])]
        row = rows.iloc[0] if len(rows) else None
        tokens = int(row["tokens"]) if row is not None else 0
        mine = [("layer", "=", layer), ("neuron", "=", unit)]
        ex, logits = self.table("examples", mine), self.table("logits", mine)
        correlated, note = self._correlated(layer, unit)
        return NeuronView(
            layer=layer, unit=unit, expert=unit // self.d_ff if self.n_experts else None, tokens=tokens,
            fire_count=int(row["fire_count"]) if row is not None else 0,
            select_count=int(row["select_count"]) if row is not None else 0,
            mean_abs=float(row["sum_abs"]) / tokens if tokens else 0.0,
            max_abs=float(row["max_abs"]) if row is not None else 0.0,
            hist=[int(c) for c in row["hist"]] if row is not None else [0] * (len(edges) + 1), hist_edges=edges,
            examples=ex.reset_index(drop=True), logits=None if logits is None else logits.sort_values(["sign", "rank"]),
            correlated=correlated, cofire_note=note)

    def _correlated(self, layer: int, unit: int) -> tuple[pd.DataFrame | None, str]:
        """The units whose firing correlates most with `unit` (phi coefficient of the two firing
        indicators), from cofire.parquet. phi = (p_ab - p_a p_b) / sqrt(p_a (1 - p_a) p_b (1 - p_b)),
        with p_ab = both / tokens counted and p_a = fire_count / the layer's tokens."""
        cf = self.table("cofire", [[("layer", "=", layer), ("a", "=", unit)], [("layer", "=", layer), ("b", "=", unit)]])
        if cf is None or cf.empty:
            sampled = (self.manifest.get("cofire_sample") or {}).get("units", 64)
            return None, (f"Neuron {unit} is not among the {sampled} hottest "
                          f"neurons of layer {layer} whose co-firing this profile counted.")
        fire = self._counts[0]
        layers = self.table("layers")
        match = layers.loc[layers["layer"] == layer, "tokens"]
        layer_tokens = max(1, int(match.iloc[0])) if len(match) else 1
        other = np.where(cf["a"] == unit, cf["b"], cf["a"])
        p_a = fire[layer, unit] / layer_tokens
        p_b = fire[layer, other] / layer_tokens
        p_ab = cf["both"].to_numpy() / np.maximum(1, cf["tokens"].to_numpy())
        var = p_a * (1 - p_a) * p_b * (1 - p_b)
        phi = np.divide(p_ab - p_a * p_b, np.sqrt(var), out=np.full(len(cf), np.nan), where=var > 0)
        phi = np.clip(phi, -1, 1)                  # p_ab from a token sample, p_a p_b from every token
        out = pd.DataFrame({"unit": other, "both": cf["both"].to_numpy(), "tokens": cf["tokens"].to_numpy(),
                            "phi": phi}).dropna(subset=["phi"])
        out = out.sort_values(["phi", "unit"], ascending=[False, True]).head(TOP_CORRELATED)
        sample = (self.manifest.get("cofire_sample") or {}).get("tokens") or layer_tokens
        note = (f"phi coefficient over a sample of {sample:,} of {layer_tokens:,} tokens" if sample < layer_tokens else
                "phi coefficient over every token") + "; a unit firing on every token or on none has no phi"
        if out.empty:
            note = (f"Neuron {unit} fires on every token of layer {layer} or on none, so its firing correlates "
                    "with no other neuron's (phi is undefined)." if p_a in (0, 1) else
                    f"No neuron sampled with neuron {unit} has a phi: each fires on every token or on none.")
        return out.reset_index(drop=True), note


def context_pieces(tokens: list[str]) -> list[str]:
    """The text each readable token of a context adds: whitespace stand-ins (· ¶, ␣ ↵ in older profiles, SentencePiece's ▁)
    turned back into whitespace; WordPiece pieces joined with a space unless they continue a word (##)."""
    if any(c in _STAND_INS for t in tokens for c in t):
        return ["".join(_STAND_INS.get(c, c) for c in t) for t in tokens]
    return [t[2:] if t.startswith("##") else (t if i == 0 else " " + t) for i, t in enumerate(tokens)]


def marked_pieces(tokens: list[str], focus: int) -> tuple[list[str], int]:
    """context_pieces and the index of the firing token's piece, the space before it (if any) split
    off into a piece of its own, so that only the token is marked."""
    pieces = context_pieces(tokens)
    if 0 <= focus < len(pieces) and pieces[focus][:1].isspace() and len(pieces[focus]) > 1:
        pieces[focus:focus + 1] = [pieces[focus][:1], pieces[focus][1:]]
        focus += 1
    return pieces, focus


def context_prompt(tokens: list[str], focus: int) -> tuple[str, int]:
    """A context as a prompt for the firing map, special tokens left out, and the index of the
    firing token among the tokens kept (the same token once the prompt is tokenized again, as long
    as the tokenizer splits it the same way)."""
    keep = [i for i, t in enumerate(tokens) if not _SPECIAL.fullmatch(t)]
    pieces = context_pieces([tokens[i] for i in keep])
    text = "".join(pieces).strip()
    return text, sum(1 for i in keep if i < focus)


def profile_of_model(model: str, root=None) -> dict | None:
    """The newest profile of this model spec, if any."""
    return next((m for m in list_profiles(root) if m.get("model") == model), None)


def strongest_unit(analysis, layer: int, token: int) -> int | None:
    """The unit with the largest dense |h| for one token of an analysis (the one a firing map's token
    detail lists first); None when the run kept no activations."""
    acts = analysis.dense_layers[layer].activations
    return None if acts is None else int(acts[token].abs().argmax())
