"""The `ray` engine: the local engine's map and merge on Ray Data (its batch-inference pattern).

Shards go in as rows of `ray.data.from_items` (index + the shard's arrays as .npy bytes); a pool of
`concurrency` stateful actors (`map_batches(_Worker, ...)`), each holding the loaded model once (a
mapper.ShardMapper), maps them to partial statistics (stats.Partial.to_bytes); the driver merges the
partials in shard order (the local engine's order, so both engines add floats in the same order),
streaming: results that arrive early wait in a buffer until their turn. No scheduler of our own.

Without an address a local cluster of `workers` CPUs is started and shut down afterwards; with one
(`auto`, `host:port`, `ray://host:port`) the driver connects and leaves the cluster running. A
host:port that does not answer a TCP connect within CONNECT_TIMEOUT_S is refused with one sentence
before Ray is asked (Ray itself would retry for minutes). Workers import this repository from the
driver's path (PYTHONPATH in the job's runtime_env): on a cluster the repo must be at the same path
on every node (README, "Corpus profiles on a Ray cluster").
"""
from __future__ import annotations

import io
import logging
import os
import socket
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from sam_viz.models import InputError

from .corpus import Shard
from .stats import Partial

CONNECT_TIMEOUT_S = 5.0
DEFAULT_WORKERS = 2
REPO = Path(__file__).resolve().parents[2]
ENV_PREFIXES = ("SAM_VIZ_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")   # what workers must see as the driver does
OnShard = Callable[[Shard, Partial], None]


def _pack(shard: Shard) -> dict:
    buf = io.BytesIO()
    np.savez(buf, ids=shard.ids, doc=shard.doc, pos=shard.pos)
    return {"index": shard.index, "shard": buf.getvalue()}


def _unpack(index: int, data: bytes) -> Shard:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return Shard(int(index), z["ids"], z["doc"], z["pos"])


class _Worker:
    """One Ray actor: loads the model once (on its GPU when Ray gave it one), maps shards to partials."""

    def __init__(self, spec: str, settings, threads: int, gpu: bool):
        import torch

        from sam_viz.models import load_model

        from .mapper import ShardMapper

        torch.set_num_threads(threads)
        loaded = load_model(spec)
        if gpu:                                        # Ray gave this actor one GPU
            loaded.model.to("cuda")
        self.mapper = ShardMapper(spec, settings, loaded=loaded)

    def __call__(self, batch: dict) -> dict:
        parts = [self.mapper(_unpack(i, data)).to_bytes() for i, data in zip(batch["index"], batch["shard"])]
        return {"index": np.asarray(batch["index"], dtype=np.int64), "partial": np.array(parts, dtype=object)}


def check_address(address: str) -> None:
    """Refuse, in one sentence, a host:port (or ray://host:port) that does not accept a connection."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"Ray address '{address[:80]}' is not auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError):
        raise InputError(f"no Ray cluster answers at '{address[:80]}' (a connection to {host}:{port} was "
                         f"refused or took over {CONNECT_TIMEOUT_S:g} s)") from None


def _runtime_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    return {"env_vars": {**env, "PYTHONPATH": path}}


def start_local(workers: int) -> None:
    """A local Ray cluster of `workers` CPUs on this machine (no dashboard, workers' logs kept off the driver)."""
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env=_runtime_env())


def _connect(address: str | None, workers: int) -> bool:
    """ray.init for this run; True when we started the (local) cluster and must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        start_local(workers)
        return True
    check_address(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=_runtime_env())
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        raise InputError(f"cannot connect to the Ray cluster at '{address[:80]}' "
                         f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
    return False


def run_ray(spec: str, settings, shards: Iterable[Shard], *, address: str | None = None,
            workers: int | None = None, total: Partial | None = None,
            on_shard: OnShard | None = None) -> Partial | None:
    """Map `shards` with ShardMapper(spec, settings) in `workers` Ray actors; merge in shard order."""
    import ray

    workers = workers or DEFAULT_WORKERS
    started = _connect(address, workers)
    try:
        return _map_merge(spec, settings, list(shards), workers, total, on_shard)
    finally:
        if started:
            ray.shutdown()


def _quiet(ray) -> None:
    """Ray Data's progress lines and INFO logs off: the profile's own progress goes to stderr."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)


def _map_merge(spec, settings, shards: list[Shard], workers: int, total, on_shard) -> Partial | None:
    import ray

    if not shards:
        return total
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) >= workers
    per = max(1, int(resources.get("CPU", 1) // workers))
    _quiet(ray)
    ds = ray.data.from_items([_pack(s) for s in shards], override_num_blocks=len(shards))
    kwargs = {"spec": spec, "settings": settings, "threads": per, "gpu": gpus}
    ds = ds.map_batches(_Worker, fn_constructor_kwargs=kwargs,
                        compute=ray.data.ActorPoolStrategy(size=workers), batch_size=1, num_cpus=per,
                        num_gpus=1 if gpus else 0, batch_format="numpy", max_restarts=0)
    by_index = {s.index: s for s in shards}
    pending, turn = {}, shards[0].index
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
        for index, data in zip(batch["index"], batch["partial"]):
            pending[int(index)] = data
        while turn in pending:
            part = Partial.from_bytes(pending.pop(turn))
            total = part if total is None else total.merge(part)
            if on_shard is not None:
                on_shard(by_index[turn], total)
            turn += 1
    return total
