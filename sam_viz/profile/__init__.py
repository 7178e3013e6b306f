"""Corpus profiles (issue 14): how a model routes over a whole corpus, per layer and per neuron.

corpus (sources, tokens, shards) -> mapper (one shard -> stats.Partial, model loaded once) ->
engine (local, ray: map + merge) -> tables + writer (Parquet tables and manifest.json); the reader
(view) opens what the writer stored. The on-disk contract is DESIGN.md's "Corpus profiles".
"""
from .view import Profile, list_profiles, open_profile
from .view import profile_root
from .writer import build_profile

__all__ = ["Profile", "build_profile", "list_profiles", "open_profile", "profile_root"]
