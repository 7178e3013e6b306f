"""The Ray engine (issue 14): the same profile as the local engine on a local 2-worker cluster (one
Ray start for the module), and an unreachable Ray address refused in one sentence before any work."""
from __future__ import annotations

import socket

import numpy as np
import pyarrow.parquet as pq
import pytest

from sam_viz import cli
from sam_viz.profile import build_profile, corpus as corpus_mod
from sam_viz.profile import ray_engine

ray = pytest.importorskip("ray")
TABLES = ("neurons", "layers", "experts", "examples", "cofire", "logits")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPUs for the module; run_ray uses it and leaves it running."""
    ray_engine.start_local(2)
    yield
    ray.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", [lambda: f"127.0.0.1:{_closed_port()}", lambda: f"ray://127.0.0.1:{_closed_port()}",
                                     lambda: "not-an-address"])
def test_an_unreachable_ray_address_is_one_error_line_and_exit_2(address, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_PROFILE_DIR", str(tmp_path))
    addr = address()
    code = cli.main(["profile", "--model", "tiny-llama", "--corpus", "builtin:calibration", "--engine", "ray",
                     "--ray-address", addr])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and addr in err[0], err
    assert not list(tmp_path.iterdir())                                 # nothing written


def test_ray_address_without_the_ray_engine_is_refused(capsys):
    code = cli.main(["profile", "--corpus", "builtin:calibration", "--ray-address", "auto"])
    assert code == 2 and capsys.readouterr().err.strip() == "error: --ray-address is for --engine ray"


def test_ray_and_local_engines_give_the_same_profile(cluster, tmp_path, monkeypatch):
    """tiny-mixtral (MoE: expert load, router entropy) over 8 shards mapped by 2 actors: counts, top-k
    lists and examples identical, floating statistics within 1e-6."""
    monkeypatch.setattr(corpus_mod, "SHARD_TOKENS", 64)
    args = dict(policy="topk", density=0.25, context=16, max_tokens=512, workers=2)
    local = build_profile("tiny-mixtral", "builtin:calibration", engine="local", root=tmp_path / "local", **args)
    seen = []
    remote = build_profile("tiny-mixtral", "builtin:calibration", engine="ray", root=tmp_path / "ray",
                           progress=lambda done, total, msg: seen.append(done), **args)
    assert ray.is_initialized()                                         # a cluster it did not start stays up
    assert remote["engine"] == "ray" and local["engine"] == "local" and remote["id"] == local["id"]
    assert remote["tokens"] == local["tokens"] == 512
    assert seen == [64 * i for i in range(1, 9)]                        # progress per shard, in shard order
    for name in TABLES:
        a = pq.read_table(tmp_path / "local" / local["id"] / f"{name}.parquet").to_pandas()
        b = pq.read_table(tmp_path / "ray" / remote["id"] / f"{name}.parquet").to_pandas()
        assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0, name
        for col in a.columns:
            x, y = a[col].to_numpy(), b[col].to_numpy()
            if x.dtype.kind == "f":
                np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=f"{name}.{col}")
            else:
                assert [str(v) for v in x] == [str(v) for v in y], (name, col)
