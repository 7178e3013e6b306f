"""Calibration on the project's own text (sparse_ops/data/calibration.json, train split), or on a
corpus of fixed-length token windows (`calibrate(..., windows=ids)`, `python -m sam_viz calibrate
--corpus`; the windows come from sam_viz.profile's corpus reader):

- thresholds for the `threshold` policy, as in CATS / TEAL: per layer, the value of
  abs(act(W_gate x)) above which the target share of neurons lies. Calibrated sequentially in one
  forward pass: layer l sees inputs that already went through the thresholded layers before it.
- per MLP unit (a layer, or one expert of an MoE layer): a low-rank predictor d -> r -> d_ff
  trained to score the oracle top-k set from the MLP input (Deja Vu), and how often each neuron is
  in the oracle top-k (the `static` policy's ranking).

On a corpus, each unit's predictor trains on a uniform sample of CORPUS_UNIT_TOKENS tokens (windows
in a seeded random order; MLP inputs and the oracle soft labels as one byte, so the memory is bounded
whatever the corpus), the static sets count the oracle top-k over every token, and the thresholds
are calibrated on the first THRESHOLD_TOKENS tokens of that order.

Trained data is stored as safetensors (never pickle) under SAM_VIZ_CACHE_DIR (default
~/.cache/sam-viz), keyed by a fingerprint of the model's weights, the settings and the texts.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sam_viz.models import LoadedModel

from .context import _RUN, Run
from .kernels import Kernel, reference
from .mlp import install
from .policy import Policy

DATA = Path(__file__).with_name("data") / "calibration.json"
SHIPPED = Path(__file__).with_name("data") / "calibrations"   # made by `calibrate` for the built-in models
GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))     # densities the app offers: 0.05 ... 1.0
TRAIN_DENSITIES = (0.1, 0.25, 0.5)                          # the predictor's soft targets
FORMAT = "sam-viz-calibration/1"
THRESHOLD_TOKENS = 3000        # real tokens used to calibrate thresholds (one padded batch)
UNIT_TOKENS = 8192             # most tokens kept per unit for predictor / static training
CORPUS_UNIT_TOKENS = 65536     # on a corpus: tokens sampled per unit for predictor training
SHARES = {"collect": 0.15, "predictors": 0.55, "static": 0.02, "thresholds": 0.28}   # of calibrate's time, roughly
log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]
Unit = tuple[int, int]         # (layer, expert); expert -1 for a dense MLP


@functools.cache
def calibration_texts() -> dict[str, tuple[str, ...]]:
    data = json.loads(DATA.read_text())
    return {"train": tuple(data["train"]), "held_out": tuple(data["held_out"])}


@dataclass(frozen=True)
class Settings:
    rank: int = 0              # 0: d_model / 8, between 8 and 256 (Deja Vu uses about d / 12)
    steps: int = 300
    lr: float = 3e-3
    batch: int = 1024
    seed: int = 0


@dataclass
class Calibration:
    fingerprint: str
    settings: Settings
    predictors: dict[Unit, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # A [r, d], B [d_ff, r], b [d_ff]
    counts: dict[Unit, torch.Tensor]          # [len(GRID), d_ff] int32: tokens with neuron j in the top-k
    thresholds: dict[float, dict[int, float]] = field(default_factory=dict)
    n_tokens: int = 0                         # calibration tokens seen (train split)
    corpus: dict | None = None                # {"source", "hash", "tokens"} when trained on a corpus
    _static: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def scores(self, unit: Unit, x: torch.Tensor) -> torch.Tensor:
        """Predicted importance of every neuron of `unit` for inputs x [n, d] -> [n, d_ff]."""
        a, b, bias = self.predictors[unit]
        return F.linear(F.linear(x, a), b, bias)

    def static_ids(self, unit: Unit, density: float, k: int) -> torch.Tensor:
        """The k neurons most often in the oracle top-k at the grid density nearest `density`."""
        key = (unit, density, k)              # ranked once: a decoder asks every layer at every step
        if key not in self._static:
            row = min(range(len(GRID)), key=lambda i: abs(GRID[i] - density))
            self._static[key] = torch.sort(-self.counts[unit][row].long(), stable=True).indices[:k]
        return self._static[key]

    def predictor_cost(self, unit: Unit) -> tuple[int, int]:
        """(FLOPs, parameters) of one predictor call for one token."""
        a, b, bias = self.predictors[unit]
        return 2 * (a.numel() + b.numel()) + bias.numel(), a.numel() + b.numel() + bias.numel()


# ---------------------------------------------------------------------------------- thresholds

_THRESHOLDS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[float, dict[int, float]]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def calibrate_thresholds(loaded: LoadedModel, density: float, kernel: Kernel = reference) -> dict[int, float]:
    """{layer: threshold} reaching `density` on the train texts; cached per model and density."""
    with _LOCK:
        cached = _THRESHOLDS.get(loaded.model, {}).get(density)
    if cached is not None:
        return cached
    enc = loaded.encode_batch(_texts_within(loaded, calibration_texts()["train"], THRESHOLD_TOKENS))
    thresholds = thresholds_on(loaded, density, enc, kernel)
    with _LOCK:
        _THRESHOLDS.setdefault(loaded.model, {})[density] = dict(thresholds)
    return thresholds


def thresholds_on(loaded: LoadedModel, density: float, enc: dict, kernel: Kernel = reference) -> dict[int, float]:
    """{layer: threshold} reaching `density` on the batch `enc` (not cached)."""
    run = Run(policy=Policy("threshold", density), kernel=kernel, calibrating=True,
              token_mask=enc["attention_mask"].reshape(-1).bool())
    _forward_with(loaded, enc, run)
    return run.thresholds


def _texts_within(loaded: LoadedModel, texts, budget: int) -> list[str]:
    out, used = [], 0
    for t in texts:
        n = len(loaded.encode(t)["input_ids"][0])
        if used + n > budget and out:
            break
        out.append(t)
        used += n
    return out


def _forward_with(loaded: LoadedModel, enc: dict, run: Run) -> None:
    token = _RUN.set(run)
    try:
        with torch.no_grad():
            loaded.model(**enc)
    finally:
        _RUN.reset(token)


# ---------------------------------------------------------------------------------- predictors

class Collector:
    """Gathers (MLP input x, activations h) of real tokens per unit during dense passes."""

    def __init__(self, limit: int = UNIT_TOKENS):
        self.limit = limit
        self.x: dict[Unit, list[torch.Tensor]] = {}
        self.h: dict[Unit, list[torch.Tensor]] = {}
        self.count: dict[Unit, int] = {}

    def add(self, unit: Unit, x: torch.Tensor, h: torch.Tensor) -> None:
        room = self.limit - self.count.get(unit, 0)
        if room <= 0 or len(x) == 0:
            return
        self.x.setdefault(unit, []).append(x[:room].detach().clone())
        self.h.setdefault(unit, []).append(h[:room].detach().clone())
        self.count[unit] = self.count.get(unit, 0) + min(room, len(x))

    def data(self, unit: Unit) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.x[unit]), torch.cat(self.h[unit])


class TargetCollector(Collector):
    """For corpora: keeps the MLP inputs and oracle soft labels (uint8 codes: labels times
    len(TRAIN_DENSITIES)) of the first `limit` tokens per unit, and counts the oracle top-k at every
    grid density over all tokens."""

    def __init__(self, limit: int = CORPUS_UNIT_TOKENS):
        super().__init__(limit)
        self.counts: dict[Unit, torch.Tensor] = {}

    def add(self, unit: Unit, x: torch.Tensor, h: torch.Tensor) -> None:
        if len(x) == 0:
            return
        counts = topk_counts(h)
        self.counts[unit] = counts + self.counts[unit] if unit in self.counts else counts
        room = self.limit - self.count.get(unit, 0)
        if room > 0:                                  # kept as Collector keeps (x, h), h as its codes
            super().add(unit, x[:room], (oracle_targets(h[:room]) * len(TRAIN_DENSITIES)).round().to(torch.uint8))

    def targets(self, unit: Unit) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d], soft labels y [n, d_ff]) of the unit's sampled tokens."""
        return torch.cat(self.x[unit]), torch.cat(self.h[unit]).float() / len(TRAIN_DENSITIES)


def collect_windows(loaded: LoadedModel, windows: torch.Tensor, progress: Progress, chunk: int = 16,
                    seed: int = 0) -> tuple[TargetCollector, int]:
    """Dense passes over token windows [W, T] in a seeded random order (so that the tokens kept per
    unit are a uniform sample of the corpus)."""
    install(loaded)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    collector = TargetCollector()
    for i in range(0, len(order), chunk):
        progress(i / len(order), f"Collecting activations on the corpus (window {i + 1:,} of {len(order):,})")
        ids = windows[order[i:i + chunk]]
        _forward_with(loaded, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      Run(policy=Policy("dense"), kernel=reference, collector=collector))
    return collector, int(windows.numel())


def collect(loaded: LoadedModel, texts, progress: Progress, chunk: int = 16) -> tuple[Collector, int]:
    install(loaded)                                  # the wrappers are what feed the collector
    collector, n_tokens = Collector(), 0
    n_batches = math.ceil(len(texts) / chunk)
    for i in range(0, len(texts), chunk):
        progress(i / len(texts), f"Collecting activations on the calibration text (batch {i // chunk + 1} "
                 f"of {n_batches})")
        enc = loaded.encode_batch(texts[i:i + chunk], max_length=loaded.max_tokens)
        mask = enc["attention_mask"].reshape(-1).bool()
        n_tokens += int(mask.sum())
        _forward_with(loaded, enc, Run(policy=Policy("dense"), kernel=reference, collector=collector,
                                       token_mask=mask))
    return collector, n_tokens


def oracle_targets(h: torch.Tensor) -> torch.Tensor:
    """Soft label per neuron: the share of TRAIN_DENSITIES at which it is in the token's top-k."""
    order = torch.sort(h.abs(), dim=-1, descending=True, stable=True).indices
    y = torch.zeros_like(h)
    for d in TRAIN_DENSITIES:
        k = max(1, round(d * h.shape[-1]))
        y.scatter_add_(1, order[:, :k], torch.full(order[:, :k].shape, 1.0 / len(TRAIN_DENSITIES)))
    return y


def topk_counts(h: torch.Tensor) -> torch.Tensor:
    """[len(GRID), d_ff] int32: how many tokens have each neuron in their top-k, at each grid density."""
    order = torch.sort(h.abs(), dim=-1, descending=True, stable=True).indices
    d_ff = h.shape[-1]
    return torch.stack([torch.bincount(order[:, :max(1, round(g * d_ff))].flatten(), minlength=d_ff)
                        for g in GRID]).int()


def train_predictor(x: torch.Tensor, h: torch.Tensor, s: Settings) -> tuple[torch.Tensor, ...]:
    """Low-rank d -> r -> d_ff scorer, BCE against the oracle soft labels of h."""
    return train_on_targets(x, oracle_targets(h), s)


def train_on_targets(x: torch.Tensor, y: torch.Tensor, s: Settings) -> tuple[torch.Tensor, ...]:
    """Low-rank d -> r -> d_ff scorer of inputs x [n, d], BCE against soft labels y [n, d_ff]."""
    gen = torch.Generator().manual_seed(s.seed)
    d, d_ff = x.shape[-1], y.shape[-1]
    r = min(s.rank or max(8, min(256, round(d / 8))), d, d_ff)
    a = (torch.randn(r, d, generator=gen) / math.sqrt(d)).requires_grad_()
    b = (torch.randn(d_ff, r, generator=gen) / math.sqrt(r)).requires_grad_()
    bias = torch.zeros(d_ff, requires_grad=True)
    opt = torch.optim.Adam([a, b, bias], lr=s.lr)
    with torch.enable_grad():
        for _ in range(s.steps):
            rows = torch.randint(0, len(x), (min(s.batch, len(x)),), generator=gen)
            loss = F.binary_cross_entropy_with_logits(F.linear(F.linear(x[rows], a), b, bias), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return a.detach(), b.detach(), bias.detach()


def calibrate(loaded: LoadedModel, settings: Settings = Settings(), progress: Progress | None = None,
              thresholds: bool = True, windows: torch.Tensor | None = None,
              corpus: dict | None = None) -> Calibration:
    """Train predictors and static counts for every unit (and thresholds on the density grid), on
    the built-in train texts, or on token `windows` [W, T] of a corpus (described by `corpus`)."""
    step = progress or (lambda frac, text: None)
    shares = SHARES if thresholds else {k: v / (1 - SHARES["thresholds"]) for k, v in SHARES.items()}
    phase = _phases(step, shares)
    if windows is None:
        collector, n_tokens = collect(loaded, calibration_texts()["train"], phase("collect"))
    else:
        collector, n_tokens = collect_windows(loaded, windows, phase("collect"), seed=settings.seed)
    units = sorted(collector.x)
    if not units:
        raise RuntimeError(f"no MLP activations were collected from {loaded.spec}")
    cal = Calibration(fingerprint(loaded, settings), settings, {}, {}, n_tokens=n_tokens, corpus=corpus)
    train = phase("predictors")
    for i, unit in enumerate(units):
        train(i / len(units), f"Training the predictor for {_unit_name(loaded, unit)}")
        cal.predictors[unit] = (train_predictor(*collector.data(unit), settings) if windows is None
                                else train_on_targets(*collector.targets(unit), settings))
    phase("static")(0.0, "Choosing the static sets")
    cal.counts = collector.counts if windows is not None else {
        unit: topk_counts(collector.data(unit)[1]) for unit in units}
    if thresholds:
        _grid_thresholds(loaded, cal, phase("thresholds"), windows, settings.seed)
    step(1.0, "Calibration done")
    return cal


def _grid_thresholds(loaded: LoadedModel, cal: Calibration, grid: Progress, windows, seed: int) -> None:
    """Thresholds at every GRID density: on the train texts, or on THRESHOLD_TOKENS tokens of the windows."""
    enc = None
    if windows is not None:
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
        ids = windows[order[:max(1, THRESHOLD_TOKENS // windows.shape[1])]]
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for j, g in enumerate(GRID):
        grid(j / len(GRID), f"Calibrating thresholds (density {g:g}, {j + 1} of {len(GRID)})")
        cal.thresholds[g] = dict(calibrate_thresholds(loaded, g) if enc is None else thresholds_on(loaded, g, enc))


def _phases(step: Progress, shares: dict[str, float]) -> Callable[[str], Progress]:
    """phase(name): a Progress over [0, 1] that `step` sees as that phase's share of the whole."""
    starts = dict(zip(shares, itertools.accumulate([0.0, *shares.values()])))
    return lambda name: lambda frac, text: step(min(1.0, starts[name] + shares[name] * frac), text)


def _unit_name(loaded: LoadedModel, unit: Unit) -> str:
    """'layer 3 of 6' (counted from 1, as a person counts), with ', expert 2 of 8' (or ', shared
    expert 1') for MoE units."""
    layer, expert = unit
    if expert >= loaded.n_experts:
        return f"layer {layer + 1} of {loaded.n_layers}, shared expert {expert - loaded.n_experts + 1}"
    return f"layer {layer + 1} of {loaded.n_layers}" + (
        f", expert {expert + 1} of {loaded.n_experts}" if expert >= 0 else "")


def static_calibration(loaded: LoadedModel, input_ids: torch.Tensor) -> Calibration:
    """Static sets only (no predictors, no thresholds), from the oracle top-k counts of the dense
    model's activations on input_ids [B, T]: the `static` policy's ranking in one forward pass, for
    a model (a benchmark's random one) where training the full calibration is not worth it."""
    install(loaded)
    collector = Collector()
    enc = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    _forward_with(loaded, enc, Run(policy=Policy("dense"), kernel=reference, collector=collector))
    counts = {unit: topk_counts(collector.data(unit)[1]) for unit in sorted(collector.x)}
    return Calibration(f"static-only-{input_ids.numel()}", Settings(), {}, counts, n_tokens=input_ids.numel())


# ---------------------------------------------------------------------------------- storage

_CALIBRATIONS: "weakref.WeakKeyDictionary[torch.nn.Module, Calibration]" = weakref.WeakKeyDictionary()
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def cache_dir() -> Path:
    return Path(os.environ.get("SAM_VIZ_CACHE_DIR") or Path.home() / ".cache" / "sam-viz") / "calibration"


def weights_digest(loaded: LoadedModel) -> str:
    """Order-independent digest of every parameter and buffer (names change when MLPs are wrapped;
    flattened, since a 0-d buffer, as Gemma 3's embedding scale, has no byte view of its own)."""
    with _LOCK:
        if loaded.model in _FINGERPRINTS:
            return _FINGERPRINTS[loaded.model]
    parts = sorted(hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.detach().contiguous().cpu()
                                  .reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                   for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    digest = hashlib.sha256("".join(parts).encode()).hexdigest()
    with _LOCK:
        _FINGERPRINTS[loaded.model] = digest
    return digest


def fingerprint(loaded: LoadedModel, settings: Settings) -> str:
    text = hashlib.sha256(DATA.read_bytes()).hexdigest()
    key = json.dumps([FORMAT, weights_digest(loaded), settings.__dict__, text, GRID, TRAIN_DENSITIES])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def path_for(loaded: LoadedModel, settings: Settings = Settings()) -> Path:
    return cache_dir() / f"{loaded.model_type}-{fingerprint(loaded, settings)}.safetensors"


def save(cal: Calibration, path: Path) -> None:
    tensors = {}
    for (layer, expert), (a, b, bias) in cal.predictors.items():
        tensors.update({f"pred.{layer}.{expert}.a": a, f"pred.{layer}.{expert}.b": b,
                        f"pred.{layer}.{expert}.bias": bias, f"count.{layer}.{expert}": cal.counts[(layer, expert)]})
    meta = {"format": FORMAT, "fingerprint": cal.fingerprint, "settings": json.dumps(cal.settings.__dict__),
            "n_tokens": str(cal.n_tokens), "corpus": json.dumps(cal.corpus),
            "thresholds": json.dumps({str(g): {str(k): v for k, v in t.items()} for g, t in cal.thresholds.items()})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load(path: Path) -> Calibration:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    tensors = load_file(str(path))
    units = {tuple(int(p) for p in k.split(".")[1:3]) for k in tensors if k.startswith("pred.")}
    predictors = {u: (tensors[f"pred.{u[0]}.{u[1]}.a"], tensors[f"pred.{u[0]}.{u[1]}.b"],
                      tensors[f"pred.{u[0]}.{u[1]}.bias"]) for u in units}
    counts = {u: tensors[f"count.{u[0]}.{u[1]}"] for u in units}
    thresholds = {float(g): {int(k): float(v) for k, v in t.items()}
                  for g, t in json.loads(meta.get("thresholds", "{}")).items()}
    return Calibration(meta["fingerprint"], Settings(**json.loads(meta["settings"])), predictors, counts,
                       thresholds, int(meta.get("n_tokens", 0)), json.loads(meta.get("corpus", "null")))


def get_calibration(loaded: LoadedModel, progress: Progress | None = None, train: bool = True,
                    settings: Settings = Settings()) -> Calibration | None:
    """The model's calibration: from memory, else from disk (the cache, then the calibrations shipped
    for the built-in models), else trained (when `train`) and stored.
    Trained here (first use of `predictor` / `static`), thresholds are left to on-demand calibration
    per density; `python -m sam_viz calibrate` also stores them for the density grid."""
    with _LOCK:
        cal = _CALIBRATIONS.get(loaded.model)
    if cal is not None:
        return cal
    path = path_for(loaded, settings)
    shipped = SHIPPED / path.name                  # the same fingerprint: the same weights, settings and texts
    if path.is_file() or shipped.is_file():
        cal = load(path if path.is_file() else shipped)
    elif not train:
        return None
    else:
        t0 = time.perf_counter()
        cal = calibrate(loaded, settings, progress, thresholds=False)
        save(cal, path)
        log.info("calibrated %s in %.1f s -> %s", loaded.spec, time.perf_counter() - t0, path)
    with _LOCK:
        _CALIBRATIONS[loaded.model] = cal
        _THRESHOLDS.setdefault(loaded.model, {}).update(cal.thresholds)
    return cal
