"""`build_profile`: corpus -> shards -> engine (map + merge) -> Parquet tables + manifest.json.

A profile's id is the first 12 hex digits of sha256(model weights digest, corpus hash, text column,
settings), so the same model, corpus and settings always give the same id: a finished profile is
returned as it is, and `resume` finds the work of an interrupted one. Work in progress lives in
`<root>/.<id>.partial/`: after a shard, at most every CHECKPOINT_S seconds, the running merged
Partial (checkpoint.npz) and the number of shards in it (checkpoint.json) are replaced atomically
(the state is tens of MB for a small model, so not after every shard); at the end the tables and the
manifest (written last) are put there and the directory is renamed to `<root>/<id>/`, so a listed
profile is always complete. Without `resume`, a leftover partial directory is started over.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch

from sam_viz.models import InputError

from . import engine as engines
from . import tables
from .corpus import read_corpus, tokenize
from .mapper import ProfileSettings, ShardMapper
from .stats import HIST_EDGES, SAMPLE_RATE, SAMPLES, Partial, TOP
from .ray_engine import DEFAULT_WORKERS
from .view import profile_root

VERSION = 1
ROW_GROUP = 65_536            # examples.parquet row groups: the neuron view reads only its own rows
CHECKPOINT_S = 30.0
ENGINES = ("local", "ray")
Progress = Callable[[int, int, str], None]      # (done tokens, total tokens, message)


def profile_id(fingerprint: str, corpus_hash: str, text_column, settings: ProfileSettings) -> str:
    key = json.dumps([VERSION, fingerprint, corpus_hash, text_column, settings.to_json()], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_checkpoint(work: Path) -> tuple[Partial | None, int, float]:
    """(merged partial, shards in it, wall seconds spent) of an interrupted run, or (None, 0, 0)."""
    try:
        state = json.loads((work / "checkpoint.json").read_text())
        return Partial.from_bytes((work / "checkpoint.npz").read_bytes()), int(state["done"]), float(state["wall_s"])
    except (OSError, ValueError, KeyError):
        return None, 0, 0.0


def build_profile(spec: str, source: str, *, policy="topk", density=0.1, context=128, max_tokens=None,
                  text_column=None, kernel=None, engine="local", ray_address=None, workers=None, resume=False,
                  root=None, progress: Progress | None = None, scope="mlp", allocation="greedy") -> dict:
    """Profile `spec` over `source`; returns the manifest (see schema.md)."""
    settings = ProfileSettings(policy=policy, density=density, context=context, max_tokens=max_tokens, kernel=kernel,
                               scope=scope, allocation=allocation)
    if engine not in ENGINES:
        raise InputError(f"unknown engine '{str(engine)[:40]}'; choose local or ray")
    corpus = read_corpus(source, text_column)
    mapper = ShardMapper(spec, settings)
    loaded = mapper.loaded
    stream = tokenize(loaded, corpus, settings.context, settings.max_tokens)
    from sam_viz.sparse_ops.calibration import weights_digest

    fingerprint = weights_digest(loaded)
    pid = profile_id(fingerprint, corpus.hash, corpus.text_column, settings)
    base = profile_root(root)
    final, work = base / pid, base / f".{pid}.partial"
    if (final / "manifest.json").is_file():
        return json.loads((final / "manifest.json").read_text())
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    total, done, spent = _load_checkpoint(work) if resume else (None, 0, 0.0)
    n_shards, start, per = stream.n_shards(), time.perf_counter(), stream.shard_tokens

    saved = [start]

    def on_shard(shard, merged: Partial) -> None:
        now = time.perf_counter()
        if now - saved[0] >= CHECKPOINT_S and shard.index + 1 < n_shards:
            saved[0] = now
            _write_atomic(work / "checkpoint.npz", merged.to_bytes())
            state = {"done": shard.index + 1, "wall_s": spent + now - start}
            _write_atomic(work / "checkpoint.json", json.dumps(state).encode())
        if progress is not None:
            tokens = min(stream.limit, (shard.index + 1) * per)
            rate = (tokens - done * per) / max(1e-9, time.perf_counter() - start)
            eta = (stream.limit - tokens) / max(rate, 1e-9)
            progress(tokens, stream.limit, f"{rate:,.0f} tokens/s, ETA {eta:,.0f} s")

    if engine == "ray":
        total = engines.run_ray(spec, settings, stream.shards(done), address=ray_address, workers=workers,
                                total=total, on_shard=on_shard)
    else:
        total = engines.run_local(mapper, stream.shards(done), total, on_shard)
    manifest = _finish(loaded, corpus, stream, settings, total, work, pid, fingerprint,
                       dict(engine=engine, workers=1 if engine == "local" else workers or DEFAULT_WORKERS,
                            shards=n_shards,
                            wall_s=spent + time.perf_counter() - start))
    os.rename(work, final)
    return manifest


def _finish(loaded, corpus, stream, settings: ProfileSettings, total: Partial, work: Path, pid: str,
            fingerprint: str, run: dict) -> dict:
    """Write the tables, then the manifest, into `work`; drop the checkpoint."""
    def strings(ids):
        return loaded.token_strings(torch.as_tensor(ids, dtype=torch.long))

    moe = loaded.n_experts > 0
    pq.write_table(tables.neurons_table(total), work / "neurons.parquet")
    pq.write_table(tables.layers_table(total, moe), work / "layers.parquet")
    if moe:
        pq.write_table(tables.experts_table(total), work / "experts.parquet")
    pq.write_table(tables.examples_table(total, stream, strings), work / "examples.parquet",
                   row_group_size=ROW_GROUP)
    cofire, sampled = tables.cofire_table(total)
    pq.write_table(cofire, work / "cofire.parquet")
    manifest = {
        "version": VERSION, "id": pid, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.spec, "model_fingerprint": fingerprint, "model_type": loaded.model_type,
        "kind": loaded.kind, "n_layers": loaded.n_layers, "d_ff": loaded.d_ff, "n_experts": loaded.n_experts,
        "units": loaded.d_ff * max(1, loaded.n_experts),
        "corpus": {"source": corpus.source, "hash": corpus.hash, "documents": len(corpus.documents),
                   "text_column": corpus.text_column},
        "settings": settings.to_json(), "tokens": stream.limit, **run,
        "hist_edges": list(HIST_EDGES), "top_n": TOP, "top_by": "abs(h), ties to the lower (doc, pos)",
        "context_radius": tables.RADIUS, "quantile_bands": [list(b) for b in tables.BANDS],
        "quantile_sample": {"token_share": 1 / SAMPLE_RATE, "per_bin": SAMPLES, "per_band": tables.PER_BAND},
        "cofire_sample": {"tokens": sampled, "units": tables.HOT},
    }
    if loaded.kind == "causal-lm":
        pq.write_table(tables.logits_table(loaded, strings), work / "logits.parquet")
        manifest["logit_effect"] = tables.LOGIT_NOTE
    for name in ("checkpoint.npz", "checkpoint.json"):
        (work / name).unlink(missing_ok=True)
    _write_atomic(work / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest
