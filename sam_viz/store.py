"""Saved runs behind share links (`?run=<id>`): an Analysis as bytes, and a SQLite run store.

Format, version 2, no pickle: one safetensors file (Hugging Face's safe tensor format). Tensors are
named `layers.<i>.<field>` and `dense_layers.<i>.<field>` after LayerFiring's fields; a field that
is None has no tensor. The header's `__metadata__` holds `format` ("sam-viz-run"), `version` ("2")
and `analysis`: JSON of every other Analysis field, with the RunSpec as a dict and the layer counts.
Version 2 adds the attributions computed before saving (sam_viz.attribution.Attribution): their
per-layer tensors as `attributions.<k>.<field>.<layer>` (neurons_dense, neurons_sparse, kept), every
other field in the JSON list `attributions`. Version 1 (no attributions) still loads.
Loading validates structure, types and shapes; anything else is one InputError sentence.

The store is SQLite in WAL mode, one transaction per save: a process killed in the middle of a save
leaves the run either whole or absent (tests/test_store_kill.py kills savers with SIGKILL). A store
that cannot be written (read-only folder, full disk, damaged file) is one StoreError sentence. A
store in a read-only folder (a teacher's runs on a read-only share) still lists and opens its runs:
through SQLite's read-only mode while a writer elsewhere keeps its WAL files, else as an immutable
file; saving there is the READ_ONLY_SAVE sentence.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import struct
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from sam_viz.models import InputError
from sam_viz.sparse_ops import LayerFiring

from .analysis import Analysis
from .attribution import KEEP, MAX_STEPS, METHODS, Attribution
from .spec import RunSpec

log = logging.getLogger(__name__)

FORMAT, VERSION = "sam-viz-run", "2"
READS = ("1", "2")                                  # versions this code loads
CORRUPT = "saved run is corrupt or from an incompatible version"
TRACES = ("layers", "dense_layers")
LAYER_FIELDS = tuple(f.name for f in fields(LayerFiring))
PER_TOKEN = ("selected", "possible", "mass_kept", "mass_total")
META_TYPES = {"kind": str, "model_type": str, "tokens": list, "d_ff": int, "n_experts": int,
              "compare": dict, "layer_divergence": list, "next_tokens": (dict, type(None)),
              "sentence_cosines": (list, type(None)), "continuation": (dict, type(None)),
              "sweep": (list, type(None)), "timings_ms": dict}
OPTIONAL_META = {"model_density": (float, int, type(None)), "projections": (list, type(None))}   # runs saved
                                                                            # before scope all lack them
NOT_SAVED = ("inputs",)          # scope all's kept-input masks: not in saved runs yet
ATTR_TENSORS = ("neurons_dense", "neurons_sparse", "kept")                # one [d_ff] tensor per layer each
ATTR_FLOAT_LISTS = ("dense", "sparse", "neuron_l1_dense", "neuron_l1_sparse")
ATTR_PAIRS = ("f_dense", "f_sparse", "floor_tokens", "floor_neurons")       # tuples of two floats
ATTR_FIELDS = tuple(f.name for f in fields(Attribution))
_KERNEL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")

DEFAULT_DB = Path("runs") / "runs.sqlite"
MAX_BLOB_BYTES = 200_000_000
BUSY_TIMEOUT_S = 30.0
PREVIEW_CHARS = 80
RUN_ID = re.compile(r"[A-Za-z0-9_-]{12}")          # secrets.token_urlsafe(9)
SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, created REAL NOT NULL, model TEXT, policy TEXT, density REAL,
    n_tokens INTEGER, prompt_preview TEXT, blob BLOB NOT NULL, digest TEXT)"""


class StoreError(InputError):
    """The run store cannot do what was asked (read-only, full, busy, damaged): one sentence."""


FULL = "the run store's disk is full, so runs cannot be saved until space is freed"
READ_ONLY = "the run store's folder is read-only or cannot be opened, so runs cannot be saved or opened here"
READ_ONLY_SAVE = "the run store's folder is read-only, so its saved runs open here but new runs cannot be saved"
BUSY = "the run store is busy with other saves; try again in a moment"
DAMAGED = "the run store's database file is damaged; ask whoever runs this server to replace it"
_WHY = {sqlite3.SQLITE_FULL: FULL, sqlite3.SQLITE_READONLY: READ_ONLY, sqlite3.SQLITE_CANTOPEN: READ_ONLY,
        sqlite3.SQLITE_PERM: READ_ONLY, sqlite3.SQLITE_BUSY: BUSY, sqlite3.SQLITE_LOCKED: BUSY,
        sqlite3.SQLITE_IOERR: "the run store's disk could not be read or written",
        sqlite3.SQLITE_CORRUPT: DAMAGED, sqlite3.SQLITE_NOTADB: DAMAGED}     # SQLite's primary result codes


def store_error(exc: Exception) -> StoreError:
    """One sentence for a failure of the store's file or folder (an sqlite3 or OS error)."""
    if isinstance(exc, sqlite3.Error):
        return StoreError(_WHY.get((exc.sqlite_errorcode or 0) & 0xFF, "the run store cannot be used right now"))
    return StoreError(FULL if getattr(exc, "errno", None) == errno.ENOSPC else READ_ONLY)


def analysis_to_bytes(a: Analysis) -> bytes:
    """One safetensors file: the firing traces as tensors, everything else as JSON metadata."""
    tensors = {f"{trace}.{i}.{name}": t.detach().cpu().clone(memory_format=torch.contiguous_format)
               for trace in TRACES for i, layer in enumerate(getattr(a, trace))
               for name in LAYER_FIELDS if (t := getattr(layer, name)) is not None}
    tensors.update({f"attributions.{k}.{name}.{i}": t.detach().cpu().contiguous()
                    for k, r in enumerate(a.attributions) for name in ATTR_TENSORS
                    for i, t in enumerate(getattr(r, name))})
    meta = {f.name: getattr(a, f.name) for f in fields(Analysis) if f.name not in TRACES + NOT_SAVED}
    meta["spec"] = asdict(a.spec)
    meta["attributions"] = [{name: getattr(r, name) for name in ATTR_FIELDS if name not in ATTR_TENSORS}
                            for r in a.attributions]
    meta["n_layers"] = {trace: len(getattr(a, trace)) for trace in TRACES}
    return safetensors.torch.save(tensors, metadata={"format": FORMAT, "version": VERSION,
                                                     "analysis": json.dumps(meta)})


def analysis_from_bytes(blob: bytes) -> Analysis:
    """The Analysis saved by analysis_to_bytes; InputError(CORRUPT) for anything else."""
    try:
        return _decode(bytes(blob))
    except Exception as e:                         # garbage can fail anywhere; the user sees one sentence
        log.info("rejected a saved run: %r", e)
        raise InputError(CORRUPT) from None


def _decode(blob: bytes) -> Analysis:
    (n,) = struct.unpack("<Q", blob[:8])             # safetensors: u64 header length, JSON header
    if not 0 < n <= len(blob) - 8:
        raise ValueError("header length out of range")
    head = json.loads(blob[8:8 + n])["__metadata__"]
    if head["format"] != FORMAT or head["version"] not in READS:
        raise ValueError(f"format {head['format']!r} version {head['version']!r}")
    meta = json.loads(head["analysis"])
    tensors = safetensors.torch.load(blob)
    counts = meta.pop("n_layers")
    saved = meta.pop("attributions", [] if head["version"] == "1" else None)
    traces = {trace: [_layer(tensors, f"{trace}.{i}") for i in range(counts[trace])] for trace in TRACES}
    for name, kind in META_TYPES.items():
        if not isinstance(meta[name], kind) or isinstance(meta[name], bool):
            raise ValueError(f"{name} has type {type(meta[name]).__name__}")
    for name, kind in OPTIONAL_META.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise ValueError(f"{name} has type {type(meta.get(name)).__name__}")
    a = Analysis(spec=_spec(meta.pop("spec")), **traces, **meta)
    _check_shapes(a)
    a.attributions = _attributions(saved, tensors, a)
    if tensors:
        raise ValueError(f"unexpected tensors {sorted(tensors)[:3]}")
    return a


def _attributions(saved: list, tensors: dict[str, torch.Tensor], a: Analysis) -> list[Attribution]:
    """The saved attributions, each checked against the analysis it belongs to; tensors are popped."""
    if not isinstance(saved, list) or len(saved) > KEEP:
        raise ValueError("attributions must be a short list")
    out = []
    for k, d in enumerate(saved):
        if not isinstance(d, dict) or set(d) != set(ATTR_FIELDS) - set(ATTR_TENSORS):
            raise ValueError("attribution fields")
        n_layers = len(d["mass_lost"]) if isinstance(d["mass_lost"], list) else -1
        if n_layers not in ((0,) if a.n_experts else (a.n_layers,)):
            raise ValueError("attribution layers do not match the analysis")
        layers = {name: [tensors.pop(f"attributions.{k}.{name}.{i}") for i in range(n_layers)] for name in ATTR_TENSORS}
        r = Attribution(**{**d, **{name: tuple(d[name]) for name in ATTR_PAIRS if isinstance(d[name], list)}},
                        **layers)
        _check_attribution(r, a)
        out.append(r)
    if len({r.key for r in out}) != len(out):
        raise ValueError("two attributions with one key")
    return out


def _check_attribution(r: Attribution, a: Analysis) -> None:
    n_tokens, n_layers = len(a.tokens), len(r.mass_lost)
    if r.tokens != a.tokens or r.method not in METHODS:
        raise ValueError("attribution tokens or method")
    ig = r.method == "ig"
    if (ig and not (_int(r.steps) and 2 <= r.steps <= MAX_STEPS)) or (not ig and r.steps is not None):
        raise ValueError("attribution steps")
    deltas = (r.delta_dense, r.delta_sparse)
    if not (all(map(_float, deltas)) if ig else deltas == (None, None)):
        raise ValueError("attribution deltas")
    want = {"causal-lm": {"kind": "logit", "id": 0, "token": ""}}.get(a.kind, {"kind": "cosine", "query": ""})
    if not (isinstance(r.target, dict) and set(r.target) == set(want) and r.target["kind"] == want["kind"]
            and all(type(r.target[k]) is type(v) for k, v in want.items())):
        raise ValueError("attribution target")
    if not all(_floats(getattr(r, name), n_tokens if name in ("dense", "sparse") else n_layers)
               for name in ATTR_FLOAT_LISTS):
        raise ValueError("attribution values")
    if not all(isinstance(getattr(r, name), tuple) and _floats(list(getattr(r, name)), 2) for name in ATTR_PAIRS):
        raise ValueError("attribution pairs")
    if not (all(x is None or _float(x) for x in r.mass_lost) and isinstance(r.timings_ms, dict)
            and all(isinstance(k, str) and _float(v) for k, v in r.timings_ms.items())):
        raise ValueError("attribution mass lost or timings")
    for name in ATTR_TENSORS:
        for t in getattr(r, name):
            if tuple(t.shape) != (a.d_ff,) or t.is_floating_point() != (name != "kept"):
                raise ValueError(f"attribution tensor {name}")
    if any(int(t.min()) < 0 or int(t.max()) > n_tokens for t in r.kept):
        raise ValueError("attribution kept counts")


def _float(x) -> bool:
    return isinstance(x, float)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _floats(values, n: int) -> bool:
    return isinstance(values, list) and len(values) == n and all(_float(v) for v in values)


def _layer(tensors: dict[str, torch.Tensor], prefix: str) -> LayerFiring:
    return LayerFiring(**{name: tensors.pop(f"{prefix}.{name}", None) for name in LAYER_FIELDS})


def _spec(d: dict) -> RunSpec:
    """Validated like any untrusted spec; a kernel this machine lacks is kept as a name (history)."""
    kernel = d.pop("kernel")
    if not isinstance(kernel, str) or not _KERNEL_NAME.fullmatch(kernel):
        raise ValueError("bad kernel name")
    spec = RunSpec(**d)
    object.__setattr__(spec, "kernel", kernel)
    return spec


def _check_shapes(a: Analysis) -> None:
    n_tokens = len(a.tokens)
    if not all(isinstance(t, str) for t in a.tokens):
        raise ValueError("tokens must be strings")
    for layer in a.layers + a.dense_layers:
        if any(t is None for t in (layer.indptr, layer.selected, layer.possible, layer.mass_kept,
                                   layer.mass_total)):
            raise ValueError("a required tensor is missing")
        if tuple(layer.indptr.shape) != (n_tokens + 1,):
            raise ValueError("indptr does not match the tokens")
        if any(tuple(getattr(layer, name).shape) != (n_tokens,) for name in PER_TOKEN):
            raise ValueError("per-token tensors do not match the tokens")
        if (layer.ids is None) != (layer.values is None):
            raise ValueError("ids and values must come together")
        if layer.ids is not None and not (layer.ids.dim() == 1 and layer.ids.shape == layer.values.shape
                                          and layer.ids.numel() == int(layer.indptr[-1])):
            raise ValueError("ids do not match indptr")
        if layer.activations is not None and tuple(layer.activations.shape) != (n_tokens, a.n_neurons):
            raise ValueError("activations do not match the tokens and neurons")


class RunStore:
    """Saved runs in SQLite (WAL). One connection per call, so any thread (Streamlit session) may
    use one shared RunStore. Ids are secrets.token_urlsafe(9): 12 URL-safe, unguessable chars."""

    def __init__(self, path: str | os.PathLike | None = None, max_bytes: int = MAX_BLOB_BYTES):
        self.path = Path(path or os.environ.get("SAM_VIZ_RUN_DB") or DEFAULT_DB)
        self.max_bytes = max_bytes
        self.read_only = False
        try:
            self._create()
        except StoreError as exc:
            if str(exc) != READ_ONLY or not self._opens_read_only():
                raise
            self.read_only = True

    def _create(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("run store folder %s: %r", self.path.parent, exc)
            raise store_error(exc) from None
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            if "digest" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:
                db.execute("ALTER TABLE runs ADD COLUMN digest TEXT")     # a store from before digests
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS runs_digest ON runs (digest)")

    def _opens_read_only(self) -> bool:
        """A store that cannot be written: whether its runs can still be read."""
        if not self.path.is_file():
            return False
        try:
            with self._db(read_only=True) as db:
                db.execute("SELECT id, created, model, policy, density, n_tokens, prompt_preview, blob "
                           "FROM runs LIMIT 1").fetchall()
            return True
        except StoreError:
            return False

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        if not read_only:
            return sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        # read-only: SQLite's locks through a writer's WAL files where they exist (it cannot make
        # them here); with none, no writer is at work and the file is read as it stands
        live = Path(f"{self.path}-wal").exists() and Path(f"{self.path}-shm").exists()
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?{'mode=ro' if live else 'immutable=1'}",
                               uri=True, timeout=BUSY_TIMEOUT_S)

    @contextmanager
    def _db(self, read_only: bool | None = None):
        """One connection and one transaction (commit, or roll back on error). A failure of the file or
        folder is a StoreError sentence; IntegrityError (an id or digest taken) is the caller's."""
        try:
            db = self._connect(self.read_only if read_only is None else read_only)
            try:
                with db:
                    yield db
            finally:
                db.close()
        except sqlite3.IntegrityError:
            raise
        except (sqlite3.Error, OSError) as exc:
            log.warning("run store %s: %r", self.path, exc)
            raise store_error(exc) from None

    @contextmanager
    def _writing(self):
        """_db for a change: in a store that reads but cannot be written (a read-only folder; or a
        read-only file that SQLite opened for reading only), READ_ONLY_SAVE."""
        if self.read_only:
            raise StoreError(READ_ONLY_SAVE)
        try:
            with self._db() as db:
                yield db
        except StoreError as exc:
            if str(exc) == READ_ONLY and self._opens_read_only():
                raise StoreError(READ_ONLY_SAVE) from None
            raise

    def save(self, analysis: Analysis) -> str:
        """The run's id: a new one, or the id it already has when the same content was saved before."""
        if self.read_only:
            raise StoreError(READ_ONLY_SAVE)
        blob = analysis_to_bytes(analysis)
        if len(blob) > self.max_bytes:
            raise InputError(f"this run is {len(blob) / 1e6:,.1f} MB saved; the limit is "
                             f"{self.max_bytes / 1e6:,.1f} MB, so try a shorter prompt")
        spec, preview, digest = analysis.spec, " ".join(analysis.spec.prompt.split()), content_digest(blob)
        if len(preview) > PREVIEW_CHARS:
            preview = preview[:PREVIEW_CHARS - 1] + "…"
        for _ in range(3):          # an id collision is ~2^-72, a digest race with another session rare
            run_id = secrets.token_urlsafe(9)
            try:
                with self._writing() as db:
                    same = db.execute("SELECT id FROM runs WHERE digest = ?", (digest,)).fetchone()
                    if same:
                        return same[0]
                    db.execute("INSERT INTO runs (id, created, model, policy, density, n_tokens, prompt_preview, "
                               "blob, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (run_id, time.time(), spec.model, spec.policy, spec.density,
                                len(analysis.tokens), preview, blob, digest))
                return run_id
            except sqlite3.IntegrityError:
                continue
        raise RuntimeError("could not allocate a run id")

    def load(self, run_id: str) -> Analysis | None:
        """The saved run, or None for an unknown or malformed id; InputError if its blob is corrupt."""
        if not valid_id(run_id):
            return None
        with self._db() as db:
            row = db.execute("SELECT blob FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else analysis_from_bytes(row[0])

    def delete(self, run_id: str) -> bool:
        if not valid_id(run_id):
            return False
        with self._writing() as db:
            return db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0

    def list(self, limit: int = 50) -> list[dict]:
        """Newest first: id, created (ISO 8601, UTC), model, policy, density, n_tokens, prompt_preview."""
        limit = max(0, min(int(limit), 10_000))
        with self._db() as db:
            rows = db.execute("SELECT id, created, model, policy, density, n_tokens, prompt_preview "
                              "FROM runs ORDER BY created DESC, rowid DESC LIMIT ?", (limit,)).fetchall()
        keys = ("id", "created", "model", "policy", "density", "n_tokens", "prompt_preview")
        return [dict(zip(keys, (r[0], _iso(r[1]), *r[2:]))) for r in rows]


def content_digest(blob: bytes) -> str:
    """sha256 of what a saved run holds, the same for the same analysis however often it is saved:
    the header's JSON with sorted keys (safetensors writes its metadata in no fixed order), without
    the timings (a recomputed run measures new ones), then the tensor bytes."""
    (n,) = struct.unpack("<Q", blob[:8])
    head = json.loads(blob[8:8 + n])
    meta = json.loads(head["__metadata__"]["analysis"])
    meta.pop("timings_ms", None)
    head["__metadata__"]["analysis"] = meta
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode() + blob[8 + n:]).hexdigest()


def valid_id(run_id) -> bool:
    return isinstance(run_id, str) and RUN_ID.fullmatch(run_id) is not None


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds")
