"""Calibration of the whole-model scope's input policies (DESIGN.md, "Sparsity on every
projection"): TEAL (Liu et al. 2024, `teal/greedyopt.py`) and WINA (microsoft/wina).

On the dense model, on the calibration text (the built-in train texts, or token windows of a corpus,
as sparse_ops/calibration.py uses), forward pre-hooks on every projection the adapter declares
collect the inputs x of real tokens, a bounded sample per (layer, input group). From them:

- **thresholds**, per (layer, projection) and density g of GRID: the t with a share g of the sampled
  entries' scores above it (the kthvalue rule of context.quantile_threshold), scores |x_i| (`teal`)
  or |x_i| * ||W[:, i]||_2 (`wina`, the column norms of the [d_out, d_in] weight, computed once).
  Exact order statistics of the sample, not histograms. Off the grid, a threshold is interpolated
  linearly in density between the neighbouring grid points (density 1 keeps everything; below the
  grid's first point, that point's threshold).
- **allocations**: `uniform` (every projection at the target) and `greedy` (sparse_ops/allocation.py),
  per kind of threshold. The greedy's error is the block's: each layer re-run on its captured inputs
  (ERROR tokens) with each projection's input masked by its threshold, relative squared error of the
  layer's output against the dense one, over real tokens.
- **block errors** of both allocations at every grid target (the app's allocation heatmap).

The hooks act only inside this module's own calls (a ContextVar gates them), so other threads'
passes over a shared model are untouched, and they are removed in `finally`. Stored as safetensors
under SAM_VIZ_CACHE_DIR, keyed by the weights digest, the settings and the text.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sam_viz.models import InputError, LoadedModel, get_path

from .allocation import GreedyPath, greedy_path, weighted_density
from .calibration import (DATA, GRID, SHIPPED, Progress, _phases, _texts_within, cache_dir, calibration_texts,
                          weights_digest)
from .mlp import SparseMLP

FORMAT = "sam-viz-input-calibration/1"
KINDS = ("teal", "wina")
ALLOCATIONS = ("uniform", "greedy")
SHARES = {"collect": 0.2, "thresholds": 0.05, "greedy": 0.75}   # of the time, roughly
log = logging.getLogger(__name__)
Corpus = tuple[torch.Tensor, dict]     # token windows [W, T] and their description ({"source", "hash", "tokens"})


@dataclass(frozen=True)
class InputSettings:
    sample_entries: int = 2 ** 20   # most input entries sampled per (layer, input group)
    max_tokens: int = 16384         # most calibration tokens read to fill the samples
    error_tokens: int = 512         # tokens the block error is measured on
    step: float = 0.05              # the greedy's step in a projection's own density
    seed: int = 0


@dataclass
class InputCalibration:
    fingerprint: str
    settings: InputSettings
    projections: tuple[str, ...]                 # the adapter's projection names, in order
    weights: torch.Tensor                        # [L, P] int64: d_out * d_in of each projection
    thresholds: dict[str, torch.Tensor]          # kind -> [L, P, len(GRID)] (at density 1: 0.0)
    paths: dict[str, list[GreedyPath]] = field(default_factory=dict)             # kind -> one per layer
    block_error: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # kind -> allocation
                                                 # -> [L, len(GRID)]: relative squared error of the layer's output
    n_tokens: int = 0                            # calibration tokens read
    corpus: dict = field(default_factory=dict)   # {"source", "tokens", ...}: what text it was calibrated on

    @property
    def source(self) -> str:
        """What text it was calibrated on, in words."""
        return f"{self.corpus.get('source', '?')} ({self.n_tokens:,} tokens)"

    def densities(self, layer: int, density: float, allocation: str = "greedy", kind: str = "teal") -> dict[str, float]:
        """Each projection's input density that `allocation` gives for the block target `density`."""
        _check(kind, allocation)
        if allocation == "uniform":
            return {p: density for p in self.projections}
        return self.paths[kind][layer].at(density)

    def threshold(self, layer: int, proj: str, density: float, allocation: str = "greedy",
                  kind: str = "teal") -> float:
        """The threshold on |x_i| (teal) or |x_i| * ||W[:, i]|| (wina) of `proj`'s input at the block
        target `density` under `allocation`; -inf keeps every entry."""
        return self.threshold_at(layer, proj, self.densities(layer, density, allocation, kind)[proj], kind)

    def threshold_at(self, layer: int, proj: str, density: float, kind: str = "teal") -> float:
        """The threshold at the projection's own input density (interpolated between grid points)."""
        if density >= 1.0:
            return -math.inf
        row = self.thresholds[kind][layer, self.projections.index(proj)]
        d = max(density, GRID[0])
        j = min(int((d - GRID[0]) / (GRID[1] - GRID[0]) + 1e-9), len(GRID) - 2)
        frac = (d - GRID[j]) / (GRID[j + 1] - GRID[j])
        return float(row[j] + (row[j + 1] - row[j]) * frac) if frac > 1e-9 else float(row[j])

    def block_error_at(self, layer: int, density: float, allocation: str = "greedy", kind: str = "teal") -> float:
        """The layer's block output error under `allocation` at the grid target nearest `density`."""
        _check(kind, allocation)
        row = min(range(len(GRID)), key=lambda g: abs(GRID[g] - density))
        return float(self.block_error[kind][allocation][layer, row])

    def weighted_density(self, layer: int, densities: dict[str, float]) -> float:
        """Share of the block's weights read with these input densities."""
        return weighted_density([densities[p] for p in self.projections], self.weights[layer].tolist())


def _check(kind: str, allocation: str) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown input policy '{kind}'; choose one of {', '.join(KINDS)}")
    if allocation not in ALLOCATIONS:
        raise InputError(f"unknown allocation '{allocation}'; choose one of {', '.join(ALLOCATIONS)}")


# ---------------------------------------------------------------------------------- the model's projections

def declared(loaded: LoadedModel):
    """The adapter's projections that this model builds (an optional one only where its config makes
    it); one sentence when the family has none declared, or is a mixture of experts (teal and wina
    calibrate no expert unit yet)."""
    if loaded.adapter.projections is None:
        raise InputError(f"scope 'all' is not available for model_type '{loaded.model_type}': its "
                         "projections are not declared yet")
    if loaded.adapter.is_moe:
        raise InputError(f"teal and wina are not available for the mixture-of-experts model_type "
                         f"'{loaded.model_type}' yet: their calibration covers no expert; use topk under scope all")
    layer = loaded.layers[0]
    entry = get_path(layer, loaded.adapter.entry)

    def built(p) -> bool:
        try:
            _resolve(layer, entry, p.path)
        except AttributeError:
            return False
        return True
    return tuple(p for p in loaded.adapter.projections if not p.optional or built(p))


def projection_modules(loaded: LoadedModel) -> list[dict[str, nn.Module]]:
    """Per layer, {projection name: its module}, found through an installed SparseMLP wrapper."""
    adapter = loaded.adapter
    out = []
    for layer in loaded.layers:
        entry = get_path(layer, adapter.entry)
        out.append({p.name: _resolve(layer, entry, p.path) for p in declared(loaded)})
    return out


def _resolve(layer: nn.Module, entry: nn.Module, path: str) -> nn.Module:
    if isinstance(entry, SparseMLP):
        try:
            return entry.resolve(path)
        except KeyError:
            pass
    return get_path(layer, path)


def weight_of(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as [d_out, d_in] (GPT-2's Conv1D stores [in, out]); through a wrapper's `dense`."""
    while not hasattr(module, "weight") and hasattr(module, "dense"):
        module = module.dense
    return module.weight.t() if conv1d else module.weight


def column_norms(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """||W[:, i]||_2 for every input entry i: [d_in] (WINA's per-weight factor)."""
    return weight_of(module, conv1d).detach().float().norm(dim=0)


# ---------------------------------------------------------------------------------- hooks

_ACTIVE: ContextVar[object | None] = ContextVar("input_calibration_hooks", default=None)


@contextmanager
def hooked(pairs: list[tuple[nn.Module, Callable]], with_kwargs: bool = False) -> Iterator[None]:
    """Forward pre-hooks fn(args[, kwargs]) on modules, acting only in this context (other threads'
    passes through a shared model see none), all removed on exit, also after an exception."""
    owner = object()
    token = _ACTIVE.set(owner)
    handles = []
    try:
        for module, fn in pairs:
            gated = (lambda m, a, k, fn=fn: fn(a, k) if _ACTIVE.get() is owner else None) if with_kwargs else (
                lambda m, a, fn=fn: fn(a) if _ACTIVE.get() is owner else None)
            handles.append(module.register_forward_pre_hook(gated, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.reset(token)


def _forward(loaded: LoadedModel, enc: dict) -> None:
    extra = {"use_cache": False} if loaded.kind == "causal-lm" else {}
    with torch.no_grad():
        loaded.model(**enc, **extra)


def _masker(t: float, colnorm: torch.Tensor | None) -> Callable:
    """Pre-hook body: x -> x * (score > t), score |x| or |x| * colnorm."""
    def fn(args):
        x = args[0]
        score = x.abs() if colnorm is None else x.abs() * colnorm.to(x.dtype)
        return (x * (score > t).to(x.dtype), *args[1:])
    return fn


# ---------------------------------------------------------------------------------- collection

def _batches(loaded: LoadedModel, texts, windows, seed: int, chunk: int = 16) -> Iterator[tuple[dict, str]]:
    """(encoded batch, its place in words) over the texts or windows, in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    if windows is not None:
        order = torch.randperm(len(windows), generator=gen)
        for i in range(0, len(order), chunk):
            ids = windows[order[i:i + chunk]]
            yield ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                   f"the corpus (window {i + 1:,} of {len(order):,})")
        return
    order = torch.randperm(len(texts), generator=gen).tolist()
    for i in range(0, len(order), chunk):
        yield (loaded.encode_batch([texts[j] for j in order[i:i + chunk]], max_length=loaded.max_tokens),
               f"the calibration text (batch {i // chunk + 1} of {math.ceil(len(order) / chunk)})")


def collect_inputs(loaded: LoadedModel, mods, settings: InputSettings, progress: Progress, texts=None,
                   windows=None) -> tuple[dict[tuple[int, str], torch.Tensor], int]:
    """{(layer, input group): x [n, d_in]} of real tokens, at most sample_entries entries each, and
    the tokens read; stops when every sample is full or max_tokens are read."""
    groups: dict[str, str] = {}                                          # group -> its first projection
    for p in declared(loaded):
        groups.setdefault(p.group, p.name)
    rows: dict[tuple[int, str], list[torch.Tensor]] = {}
    room: dict[tuple[int, str], int] = {}
    mask = [None]

    def keep(key):
        def fn(args):
            x = args[0].reshape(-1, args[0].shape[-1])[mask[0]]          # [n, d_in] real tokens
            left = room.setdefault(key, settings.sample_entries // x.shape[-1])
            if left > 0:
                rows.setdefault(key, []).append(x[:left].detach().float().clone())
                room[key] = left - min(left, len(x))
        return fn

    pairs = [(layer[name], keep((i, g))) for i, layer in enumerate(mods) for g, name in groups.items()]
    n_tokens, total = 0, settings.max_tokens
    with hooked(pairs):
        for enc, where in _batches(loaded, texts, windows, settings.seed):
            if n_tokens >= total or (room and all(v <= 0 for v in room.values())):
                break
            progress(n_tokens / total, f"Collecting projection inputs on {where}")
            mask[0] = enc["attention_mask"].reshape(-1).bool()
            n_tokens += int(mask[0].sum())
            _forward(loaded, enc)
    return {k: torch.cat(v) for k, v in rows.items()}, n_tokens


def grid_thresholds(scores: torch.Tensor) -> torch.Tensor:
    """[len(GRID)]: at each grid density g, sorted[n - k - 1] with k = round(g * n), so that k of the
    n scores are above it (no ties); at density 1, 0.0 (scores are >= 0)."""
    s = scores.flatten().float().sort().values
    n = s.numel()
    return torch.tensor([0.0 if round(g * n) >= n else float(s[n - round(g * n) - 1]) for g in GRID])


# ---------------------------------------------------------------------------------- block error

class BlockProbe:
    """One layer re-run on its captured inputs with each projection's input masked by a threshold."""

    def __init__(self, layer: nn.Module, mods: dict[str, nn.Module], inputs: list[tuple[tuple, dict, torch.Tensor]]):
        self.layer, self.mods, self.inputs = layer, mods, inputs
        self.dense = [self._run(a, k, m) for a, k, m in inputs]
        self.norm = sum(float(y.double().pow(2).sum()) for y in self.dense)

    def _run(self, args, kwargs, mask) -> torch.Tensor:
        with torch.no_grad():
            out = self.layer(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        return y.reshape(-1, y.shape[-1])[mask]                          # [n, d] real tokens

    def error(self, masks: dict[str, tuple[float, torch.Tensor | None]]) -> float:
        """Relative squared error of the layer's output with {proj: (threshold, column norms or None)}."""
        pairs = [(self.mods[p], _masker(t, c)) for p, (t, c) in masks.items() if t > -math.inf]
        with hooked(pairs):
            err = sum(float((self._run(a, k, m) - y).double().pow(2).sum())
                      for (a, k, m), y in zip(self.inputs, self.dense))
        return err / max(self.norm, 1e-30)


def capture_layer_inputs(loaded: LoadedModel, enc: dict) -> list[list[tuple[tuple, dict, torch.Tensor]]]:
    """Per layer, [(args, kwargs, real-token mask)] of its call on `enc` (dense)."""
    mask = enc["attention_mask"].reshape(-1).bool()
    got: list[list] = [[] for _ in loaded.layers]

    def grab(i):
        def fn(args, kwargs):
            got[i].append(((args[0].detach().clone(), *args[1:]), dict(kwargs), mask))
        return fn

    with hooked([(layer, grab(i)) for i, layer in enumerate(loaded.layers)], with_kwargs=True):
        _forward(loaded, enc)
    return got


def _error_batch(loaded: LoadedModel, texts, windows, settings: InputSettings) -> dict:
    if windows is not None:
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(settings.seed + 1))
        ids = windows[order[:max(1, settings.error_tokens // windows.shape[1])]]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return loaded.encode_batch(_texts_within(loaded, texts, settings.error_tokens), max_length=loaded.max_tokens)


# ---------------------------------------------------------------------------------- calibration

def calibrate_inputs(loaded: LoadedModel, settings: InputSettings = InputSettings(), progress: Progress | None = None,
                     windows: torch.Tensor | None = None, corpus: dict | None = None) -> InputCalibration:
    """Thresholds, greedy paths and block errors for every (layer, projection), on the built-in
    train texts or on token `windows` [W, T] of a corpus (described by `corpus`)."""
    step = progress or (lambda frac, text: None)
    phase = _phases(step, SHARES)
    projs = declared(loaded)
    texts = calibration_texts()["train"] if windows is None else None
    mods = projection_modules(loaded)
    samples, n_tokens = collect_inputs(loaded, mods, settings, phase("collect"), texts, windows)
    names = tuple(p.name for p in projs)
    conv1d = loaded.adapter.conv1d
    norms = [{p: column_norms(layer[p], conv1d) for p in names} for layer in mods]
    thresholds = {kind: torch.zeros(len(mods), len(names), len(GRID)) for kind in KINDS}
    for i in range(len(mods)):
        phase("thresholds")(i / len(mods), f"Sorting the samples for thresholds (layer {i + 1} of {len(mods)})")
        for j, p in enumerate(projs):
            x = samples[(i, p.group)].abs()
            thresholds["teal"][i, j] = grid_thresholds(x)
            thresholds["wina"][i, j] = grid_thresholds(x * norms[i][p.name])
    weights = torch.tensor([[weight_of(layer[p], conv1d).numel() for p in names] for layer in mods])
    cal = InputCalibration(fingerprint(loaded, settings, corpus_key(windows)), settings, names, weights,
                           thresholds, n_tokens=n_tokens,
                           corpus=corpus or {"source": "the built-in calibration text (train split)"})
    inputs = capture_layer_inputs(loaded, _error_batch(loaded, texts, windows, settings))
    _allocate(loaded, cal, mods, norms, inputs, phase("greedy"))
    step(1.0, "Input calibration done")
    return cal


def _allocate(loaded, cal: InputCalibration, mods, norms, inputs, progress: Progress) -> None:
    """Greedy paths and the block errors of both allocations, per kind and layer."""
    n = len(mods)
    for kind in KINDS:
        cal.paths[kind] = []
        errors = {a: torch.zeros(n, len(GRID), dtype=torch.float64) for a in ALLOCATIONS}
        for i, layer in enumerate(loaded.layers):
            probe = BlockProbe(layer, mods[i], inputs[i])

            def error(dens, i=i, kind=kind, probe=probe):
                return probe.error({p: (cal.threshold_at(i, p, d, kind), norms[i][p] if kind == "wina" else None)
                                    for p, d in dens.items()})

            at = (KINDS.index(kind) * n + i) / (len(KINDS) * n)
            cal.paths[kind].append(greedy_path(error, dict(zip(cal.projections, cal.weights[i].tolist())),
                                               cal.settings.step, GRID[0], lambda s, total, at=at, i=i, kind=kind:
                                               progress(at + s / total / (len(KINDS) * n),
                                                        f"Choosing the greedy allocation, {kind} (layer {i + 1} "
                                                        f"of {n}, step {s + 1} of {total})")))
            for g, target in enumerate(GRID):
                for a in ALLOCATIONS:
                    errors[a][i, g] = error(cal.densities(i, target, a, kind))
        cal.block_error[kind] = errors


# ---------------------------------------------------------------------------------- storage

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, InputCalibration]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def corpus_key(windows: torch.Tensor | None) -> str:
    """What the calibration read: the built-in texts' file, or the corpus windows' bytes."""
    if windows is None:
        return hashlib.sha256(DATA.read_bytes()).hexdigest()
    return hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()


def fingerprint(loaded: LoadedModel, settings: InputSettings, source: str) -> str:
    projs = [[p.name, p.path, p.group] for p in declared(loaded)]
    key = json.dumps([FORMAT, weights_digest(loaded), asdict(settings), source, GRID, projs])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def path_for(loaded: LoadedModel, settings: InputSettings = InputSettings(), windows=None) -> Path:
    """Where the calibration on the built-in texts (windows None) or on corpus `windows` is stored."""
    return cache_dir() / f"{loaded.model_type}-inputs-{fingerprint(loaded, settings, corpus_key(windows))}.safetensors"


def save(cal: InputCalibration, path: Path) -> None:
    tensors = {"weights": cal.weights}
    for kind in cal.thresholds:
        tensors[f"thresholds.{kind}"] = cal.thresholds[kind]
        paths = cal.paths[kind]
        tensors[f"path.{kind}.densities"] = torch.tensor([p.densities for p in paths], dtype=torch.float64)
        tensors[f"path.{kind}.errors"] = torch.tensor([p.errors for p in paths], dtype=torch.float64)
        tensors[f"path.{kind}.moved"] = torch.tensor([p.moved for p in paths], dtype=torch.int64)
        for a, t in cal.block_error[kind].items():
            tensors[f"block_error.{kind}.{a}"] = t
    meta = {"format": FORMAT, "fingerprint": cal.fingerprint, "settings": json.dumps(asdict(cal.settings)),
            "projections": json.dumps(cal.projections), "n_tokens": str(cal.n_tokens),
            "corpus": json.dumps(cal.corpus), "grid": json.dumps(GRID)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load(path: Path) -> InputCalibration:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if meta.get("format") != FORMAT or tuple(json.loads(meta["grid"])) != GRID:
        raise ValueError(f"{path} is not a {FORMAT} file for this density grid")
    t = load_file(str(path))
    names = tuple(json.loads(meta["projections"]))
    kinds = [k.split(".")[1] for k in t if k.startswith("thresholds.")]
    weights = t["weights"]
    paths = {kind: [GreedyPath(names, tuple(weights[i].tolist()), tuple(map(tuple, d.tolist())), tuple(e.tolist()),
                               tuple(m.tolist()))
                    for i, (d, e, m) in enumerate(zip(t[f"path.{kind}.densities"], t[f"path.{kind}.errors"],
                                                      t[f"path.{kind}.moved"]))] for kind in kinds}
    errors = {kind: {a: t[f"block_error.{kind}.{a}"] for a in ALLOCATIONS} for kind in kinds}
    return InputCalibration(meta["fingerprint"], InputSettings(**json.loads(meta["settings"])), names, weights,
                            {kind: t[f"thresholds.{kind}"] for kind in kinds}, paths, errors,
                            int(meta["n_tokens"]), json.loads(meta["corpus"]))


def get_input_calibration(loaded: LoadedModel, corpus: Corpus | None = None, progress: Progress | None = None,
                          settings: InputSettings | None = None, train: bool = True,
                          force: bool = False) -> InputCalibration | None:
    """The model's input calibration on the built-in text (or on `corpus`: its windows and their
    description): from memory, else from disk (the cache, then the calibrations shipped for the
    built-in models), else calibrated (when `train`) and stored. `force` calibrates again."""
    settings = settings or InputSettings()
    windows, description = corpus if corpus is not None else (None, None)
    path = path_for(loaded, settings, windows)
    with _LOCK:
        cal = None if force else _CACHE.get(loaded.model, {}).get(path.name)
    if cal is not None:
        return cal
    shipped = SHIPPED / path.name
    if not force and (path.is_file() or shipped.is_file()):
        cal = load(path if path.is_file() else shipped)
    elif not train:
        return None
    else:
        t0 = time.perf_counter()
        cal = calibrate_inputs(loaded, settings, progress, windows=windows, corpus=description)
        save(cal, path)
        log.info("input calibration of %s in %.1f s -> %s", loaded.spec, time.perf_counter() - t0, path)
    with _LOCK:
        _CACHE.setdefault(loaded.model, {})[path.name] = cal
    return cal
