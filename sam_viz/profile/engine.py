"""Engines move shards to a map function and partials to the merge; they know no statistics.

`run_local` maps the shards in-process, one after the other, merging as it goes (memory: one
running Partial). `run_ray` runs the same ShardMapper in a pool of Ray actors and the same merge,
in the same shard order (ray_engine.py; Ray is imported only when it is used).
"""
from __future__ import annotations

from typing import Callable, Iterable

from .corpus import Shard
from .stats import Partial

OnShard = Callable[[Shard, Partial], None]      # (shard just mapped, running merged total)


def run_local(mapper: Callable[[Shard], Partial], shards: Iterable[Shard], total: Partial | None = None,
              on_shard: OnShard | None = None) -> Partial | None:
    """Map every shard and merge the partials into `total` (None: start from the first shard's)."""
    for shard in shards:
        part = mapper(shard)
        total = part if total is None else total.merge(part)
        if on_shard is not None:
            on_shard(shard, total)
    return total


def run_ray(spec: str, settings, shards: Iterable[Shard], *, address: str | None = None,
            workers: int | None = None, total: Partial | None = None,
            on_shard: OnShard | None = None) -> Partial | None:
    """The same map (ShardMapper(spec, settings) per actor) and merge on Ray Data."""
    from .ray_engine import run_ray as ray_run

    return ray_run(spec, settings, shards, address=address, workers=workers, total=total, on_shard=on_shard)
