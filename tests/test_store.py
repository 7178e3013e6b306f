"""Saved runs: byte round trip of every Analysis field (checked field by field, independently of the
serialiser) and of the attributions saved with it, corrupt input, the old format (version 1), and
the SQLite run store (restart, WAL, ids, hostile ids, threads)."""
import json
import math
import re
import sqlite3
import struct
import threading
from dataclasses import fields, is_dataclass, replace
from datetime import datetime

import pytest
import safetensors.torch
import torch

from conftest import shared
from sam_viz import Analysis, InputError, RunSpec, analyze, density_sweep, greedy_continuation
from sam_viz.attribution import KEEP, attribute, recall, remember
from sam_viz.store import RunStore, analysis_from_bytes, analysis_to_bytes

HOSTILE_IDS = ("' OR 1=1 --", "x" * 10_000, "", None, 123, "../../etc/pass", "AAAAAAAAAAA\x00",
               "AAAAAAAAAAAA;", "ÄAAAAAAAAAAA", "AAAAAAAAAAAA\n", ["AAAAAAAAAAAA"])


def run(spec, prompt="The cat sat on the mat. Then it slept.", policy="threshold", density=0.3, attributions=()):
    """An analysis, with the attributions computed for it (as the Attribution page keeps them)."""
    a = analyze(shared(spec), RunSpec(prompt=prompt, model=spec, policy=policy, density=density))
    for kwargs in attributions:
        remember(a, attribute(shared(spec), a.spec, **kwargs))
    return a


@pytest.fixture(scope="module")
def llama():
    a = run("tiny-llama", attributions=[dict(method="ig", steps=8), dict(method="ixg", target_id=5)])
    m = shared("tiny-llama")
    a.sweep = density_sweep(m, a.spec, densities=(0.1, 0.5))
    a.continuation = greedy_continuation(m, a.spec, 5)
    return a


@pytest.fixture(scope="module")
def mixtral():
    return run("tiny-mixtral", policy="topk", attributions=[dict(method="ixg")])


@pytest.fixture(scope="module")
def bert():
    prompt = "First sentence here. A second one! And a third?"
    return run("tiny-bert", prompt=prompt, attributions=[dict(method="ixg", query=prompt), dict(steps=4)])


def assert_same(x, y, path="analysis"):
    """Deep equality that checks types, tensor dtypes and values, and None."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor), path
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), path
    elif is_dataclass(x):
        assert type(x) is type(y), path
        for f in fields(x):
            assert_same(getattr(x, f.name), getattr(y, f.name), f"{path}.{f.name}")
    elif isinstance(x, dict):
        assert isinstance(y, dict) and list(x) == list(y), path
        for k in x:
            assert_same(x[k], y[k], f"{path}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same(u, v, f"{path}[{i}]")
    elif isinstance(x, float) and math.isnan(x):
        assert isinstance(y, float) and math.isnan(y), path
    else:
        assert type(x) is type(y) and x == y, path


@pytest.mark.parametrize("name", ["llama", "mixtral", "bert"])
def test_round_trip_reproduces_every_field(name, request):
    a = request.getfixturevalue(name)
    b = analysis_from_bytes(analysis_to_bytes(a))
    assert isinstance(b, Analysis) and b is not a
    assert_same(a, b)
    assert a.layers[0].activations is not None and a.dense_layers[0].ids is None   # both kinds covered
    assert (b.density, b.n_neurons, b.n_layers, b.has_activations, b.trace_nbytes(), b.to_json()) == \
           (a.density, a.n_neurons, a.n_layers, a.has_activations, a.trace_nbytes(), a.to_json())


def test_round_trip_covers_optional_fields(llama, mixtral, bert):
    assert llama.sweep and llama.continuation and llama.next_tokens and llama.sentence_cosines is None
    assert mixtral.n_experts > 0 and mixtral.layers[0].experts is not None
    assert mixtral.layers[0].expert_weights.dtype == torch.float16
    assert bert.sentence_cosines and len(bert.sentence_cosines) == 3 and bert.next_tokens is None
    b = analysis_from_bytes(analysis_to_bytes(mixtral))
    assert torch.equal(b.layers[1].experts, mixtral.layers[1].experts)
    assert [len(a.attributions) for a in (llama, mixtral, bert)] == [2, 1, 2]
    assert mixtral.attributions[0].mass_lost == [] and len(llama.attributions[0].mass_lost) == 2
    assert bert.attributions[0].mass_lost == [None, None]         # its query is the prompt: dense is noise
    assert {a.target["kind"] for a in bert.attributions} == {"cosine"}


def test_round_trip_of_unusual_values(llama):
    a = analysis_from_bytes(analysis_to_bytes(llama))
    a.compare = {"kl": float("nan"), "max_abs_diff": float("inf")}
    a.tokens = ["<script>", "\u2581caf\u00e9", "\ud83d", "\x00"] + a.tokens[4:]
    a.attributions = [replace(r, tokens=a.tokens, f_dense=(float("nan"), float("-inf"))) for r in a.attributions]
    a.layers[0].activations = None
    assert_same(a, analysis_from_bytes(analysis_to_bytes(a)))


def _header(blob):
    return json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])["__metadata__"]


def _with_metadata(blob, **changes):
    meta = _header(blob)
    analysis = json.loads(meta["analysis"])
    for key, value in changes.items():
        if key in ("format", "version"):
            meta[key] = value
        else:
            analysis[key] = value
    meta["analysis"] = json.dumps(analysis)
    return safetensors.torch.save(safetensors.torch.load(blob), metadata=meta)


def test_malformed_bytes_raise_one_input_error(llama):
    good = analysis_to_bytes(llama)
    tensors = safetensors.torch.load(good)
    tensors["layers.0.selected"] = tensors["layers.0.selected"][:-1].clone()
    cases = [b"", b"garbage", b"\xff" * 8 + b"{}", struct.pack("<Q", 2**63) + b"{}", good[:-10], good[:100],
             bytes(reversed(good)), safetensors.torch.save({"x": torch.zeros(2)}),
             _with_metadata(good, version="999"), _with_metadata(good, format="other"),
             _with_metadata(good, tokens="not a list"), _with_metadata(good, d_ff=True),
             _with_metadata(good, spec={"prompt": "", "model": "x", "policy": "topk", "density": 0.5,
                                        "kernel": "reference"}),
             _with_metadata(good, surprise=1), _with_metadata(good, n_layers={"layers": 99, "dense_layers": 0}),
             safetensors.torch.save(tensors, metadata=_header(good))]
    for blob in cases:
        with pytest.raises(InputError, match="^saved run is corrupt or from an incompatible version$"):
            analysis_from_bytes(blob)


def _with_attribution(blob, k=0, tensors=None, **changes):
    """The blob with fields of its k-th saved attribution changed, and tensors changed (None: drop)."""
    meta = _header(blob)
    analysis = json.loads(meta["analysis"])
    analysis["attributions"][k].update(changes)
    meta["analysis"] = json.dumps(analysis)
    stored = safetensors.torch.load(blob)
    for name, t in (tensors or {}).items():
        if t is None:
            del stored[name]
        else:
            stored[name] = t
    return safetensors.torch.save(stored, metadata=meta)


def _version_1(blob, keep_tensors=False):
    """The blob as version 1 wrote it: no attributions in the metadata, none in the tensors."""
    meta = _header(blob)
    analysis = json.loads(meta["analysis"])
    del analysis["attributions"]
    stored = {k: v for k, v in safetensors.torch.load(blob).items() if keep_tensors or not k.startswith("attributions.")}
    return safetensors.torch.save(stored, metadata={**meta, "version": "1", "analysis": json.dumps(analysis)})


def test_saved_attributions_come_back_as_computed(llama, bert):
    for a in (llama, bert):
        b = analysis_from_bytes(analysis_to_bytes(a))
        assert_same(a.attributions, b.attributions)
        assert [r.key for r in b.attributions] == [r.key for r in a.attributions]
        assert [r.to_json() for r in b.attributions] == [r.to_json() for r in a.attributions]
    assert llama.attributions[1].key == ("ixg", None, 5, None)


def test_old_format_without_attributions_still_loads(llama, bert):
    for a in (llama, bert):
        old = analysis_from_bytes(_version_1(analysis_to_bytes(a)))
        assert old.attributions == []
        assert_same(replace(a, attributions=[]), old)
    with pytest.raises(InputError, match="^saved run is corrupt or from an incompatible version$"):
        analysis_from_bytes(_version_1(analysis_to_bytes(llama), keep_tensors=True))


def test_hostile_attribution_metadata_raises_one_input_error(llama, bert):
    good = analysis_to_bytes(llama)
    n_tokens = len(llama.tokens)
    meta = json.loads(_header(good)["analysis"])
    first, tensors = meta["attributions"][0], safetensors.torch.load(good)
    copy_tensors = {k.replace("attributions.0.", "attributions.2."): v for k, v in tensors.items()
                    if k.startswith("attributions.0.")}
    cases = [_with_metadata(good, attributions="x"), _with_metadata(good, attributions=[{}]),
             _with_metadata(good, attributions=[first] * (KEEP + 1)),
             _with_metadata(good, attributions=meta["attributions"] + [first]),       # tensors missing
             _with_attribution(_with_metadata(good, attributions=meta["attributions"] + [first]),
                               tensors=copy_tensors),                                 # the same key twice
             _with_attribution(good, method="shap"), _with_attribution(good, steps=0),
             _with_attribution(good, steps="8"), _with_attribution(good, steps=True),
             _with_attribution(good, k=1, steps=8), _with_attribution(good, delta_dense=None),
             _with_attribution(good, target={"kind": "cosine", "query": "x"}),
             _with_attribution(good, target={"kind": "logit", "id": "5", "token": "a"}),
             _with_attribution(good, target={**first["target"], "extra": 1}),
             _with_attribution(good, dense=first["dense"][:-1]), _with_attribution(good, dense=["1"] * n_tokens),
             _with_attribution(good, sparse=[True] * n_tokens), _with_attribution(good, f_dense=[1.0, 2.0, 3.0]),
             _with_attribution(good, mass_lost=[0.1]), _with_attribution(good, mass_lost=["x", 0.1]),
             _with_attribution(good, neuron_l1_dense=[1.0]), _with_attribution(good, tokens=["a"] * n_tokens),
             _with_attribution(good, timings_ms={"total": "slow"}), _with_attribution(good, floor_tokens="x"),
             _with_attribution(good, surprise=1),
             _with_attribution(good, tensors={"attributions.0.neurons_dense.0": torch.zeros(3)}),
             _with_attribution(good, tensors={"attributions.0.kept.1": torch.full((llama.d_ff,), n_tokens + 1)}),
             _with_attribution(good, tensors={"attributions.0.kept.1": torch.zeros(llama.d_ff)}),
             _with_attribution(good, tensors={"attributions.0.neurons_sparse.1": None}),
             _with_attribution(good, tensors={"attributions.0.neurons_dense.9": torch.zeros(llama.d_ff)}),
             _with_attribution(analysis_to_bytes(bert), target={"kind": "logit", "id": 1, "token": "a"})]
    analysis_from_bytes(_with_attribution(good))                      # unchanged, it loads
    headless = _header(good)
    del headless["analysis"]
    no_list = json.loads(_header(good)["analysis"])
    del no_list["attributions"]
    cases.append(safetensors.torch.save(tensors, metadata={**headless, "analysis": json.dumps(no_list)}))
    for blob in cases:
        with pytest.raises(InputError, match="^saved run is corrupt or from an incompatible version$"):
            analysis_from_bytes(blob)


def test_an_analysis_keeps_its_most_recently_used_attributions(llama):
    a = replace(llama, attributions=[])
    results = [replace(llama.attributions[0], steps=s) for s in range(2, 2 + KEEP + 2)]
    for r in results:
        remember(a, r)
    assert [r.steps for r in a.attributions] == [r.steps for r in results[-KEEP:]]
    oldest = a.attributions[0]
    assert recall(a, oldest.key) is oldest and a.attributions[-1] is oldest
    assert recall(a, ("ig", 999, None, None)) is None
    remember(a, results[0])                                          # the least recently used one goes
    assert [r.steps for r in a.attributions] == [r.steps for r in results[-KEEP + 2:]] + [oldest.steps, 2]


def test_kernel_missing_here_is_kept_as_history(llama):
    good = analysis_to_bytes(llama)
    spec = json.loads(_header(good)["analysis"])["spec"]
    blob = _with_metadata(good, spec={**spec, "kernel": "triton"})
    assert analysis_from_bytes(blob).spec.kernel == "triton"


def test_store_persists_across_restart_and_uses_wal(tmp_path, llama, bert):
    path = tmp_path / "deep" / "runs.sqlite"
    ids = [RunStore(path).save(a) for a in (llama, bert)]
    store = RunStore(path)                                   # a brand-new object: a server restart
    assert_same(llama, store.load(ids[0]))
    assert_same(bert, store.load(ids[1]))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_paths(tmp_path, monkeypatch, bert):
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "env" / "r.sqlite"))
    run_id = RunStore().save(bert)
    assert (tmp_path / "env" / "r.sqlite").exists() and RunStore(tmp_path / "env" / "r.sqlite").load(run_id)
    monkeypatch.delenv("SAM_VIZ_RUN_DB")
    monkeypatch.chdir(tmp_path)
    RunStore()
    assert (tmp_path / "runs" / "runs.sqlite").exists()


def test_ids_are_short_url_safe_and_distinct(tmp_path, bert):
    store = RunStore(tmp_path / "r.sqlite")
    ids = [store.save(replace(bert, spec=replace(bert.spec, prompt=f"{bert.spec.prompt} {i}"))) for i in range(50)]
    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{12}", i) for i in ids)


def test_hostile_and_unknown_ids(tmp_path, bert):
    store = RunStore(tmp_path / "r.sqlite")
    run_id = store.save(bert)
    for bad in HOSTILE_IDS + ("AAAAAAAAAAAA", run_id[:-1], run_id + "A"):
        assert store.load(bad) is None
        assert store.delete(bad) is False
    assert store.load(run_id) is not None and len(store.list()) == 1
    assert store.delete(run_id) is True and store.load(run_id) is None and store.delete(run_id) is False


def test_corrupt_blob_in_store_raises_input_error(tmp_path, bert):
    store = RunStore(tmp_path / "r.sqlite")
    run_id = store.save(bert)
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        db.execute("UPDATE runs SET blob = ? WHERE id = ?", (b"\x00" * 64, run_id))
    with pytest.raises(InputError, match="corrupt"):
        store.load(run_id)


def test_size_bound(tmp_path, bert):
    store = RunStore(tmp_path / "r.sqlite", max_bytes=1000)
    with pytest.raises(InputError, match="limit"):
        store.save(bert)
    assert store.list() == []


def test_list_newest_first(tmp_path, bert, llama, mixtral):
    store = RunStore(tmp_path / "r.sqlite")
    ids = [store.save(a) for a in (bert, llama, mixtral)]
    rows = store.list()
    assert [r["id"] for r in rows] == ids[::-1]
    assert [r["id"] for r in store.list(limit=2)] == ids[:0:-1]
    top = rows[0]
    assert set(top) == {"id", "created", "model", "policy", "density", "n_tokens", "prompt_preview"}
    assert (top["model"], top["policy"], top["density"], top["n_tokens"]) == \
           ("tiny-mixtral", "topk", 0.3, len(mixtral.tokens))
    assert top["prompt_preview"] == mixtral.spec.prompt
    assert datetime.fromisoformat(top["created"]).tzinfo is not None
    long = analysis_from_bytes(analysis_to_bytes(bert))
    long.spec = RunSpec(prompt="word " * 100, model="tiny-bert")
    store.save(long)
    assert len(store.list()[0]["prompt_preview"]) <= 80


def test_threads_save_and_load_concurrently(tmp_path, bert, llama):
    store = RunStore(tmp_path / "r.sqlite")
    errors, saved = [], []

    def work(a):
        try:
            for _ in range(5):
                run_id = store.save(a)
                assert_same(a, store.load(run_id))
                saved.append(run_id)
                store.list()
        except Exception as e:            # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(a,)) for a in (bert, llama, bert, llama)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(saved) == 20 and len(set(saved)) == 2 and len(store.list()) == 2   # one row per run


def test_saving_the_same_analysis_again_gives_its_id_and_no_new_row(tmp_path, llama, bert):
    """Same content (also a copy read back from bytes, or one with new timings, as a recomputed run
    has) -> the same id; anything else that is saved -> a new id."""
    store = RunStore(tmp_path / "r.sqlite")
    run_id = store.save(llama)
    assert store.save(llama) == run_id
    assert store.save(analysis_from_bytes(analysis_to_bytes(llama))) == run_id
    assert store.save(replace(llama, timings_ms={"total": 1.0})) == run_id
    with_sweep = store.save(replace(llama, sweep=llama.sweep[:1]))
    other = store.save(bert)
    assert len({run_id, with_sweep, other}) == 3
    assert sorted(r["id"] for r in store.list()) == sorted([run_id, with_sweep, other])
    assert RunStore(tmp_path / "r.sqlite").save(llama) == run_id              # after a restart too


def test_a_store_from_before_digests_keeps_working(tmp_path, llama, bert):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:                  # the schema and insert of the store's first version
        db.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, created REAL NOT NULL, model TEXT, policy TEXT, "
                   "density REAL, n_tokens INTEGER, prompt_preview TEXT, blob BLOB NOT NULL)")
        db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ("oldrun000001", 1.0, "tiny-bert", "threshold",
                   0.3, len(bert.tokens), "old", analysis_to_bytes(bert)))
    store = RunStore(path)
    assert_same(bert, store.load("oldrun000001"))
    run_id = store.save(llama)
    assert store.save(llama) == run_id and store.load(run_id) is not None
    assert [r["id"] for r in store.list()] == [run_id, "oldrun000001"]
