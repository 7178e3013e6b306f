"""Corpus profiles, write side (issue 14): statistics recomputed by hand from a fresh model's
activations, exact merges, bounded state, bad input in the CLI, and an interrupted profile resumed."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sam_viz.models import InputError, load_model
from sam_viz import cli
from sam_viz.profile import build_profile, corpus as corpus_mod, writer
from sam_viz.profile.accumulate import oracle_mask
from sam_viz.profile.corpus import read_corpus, tokenize
from sam_viz.profile.engine import run_local
from sam_viz.profile.mapper import ProfileSettings, ShardMapper
from sam_viz.profile.stats import Partial, sum_partials
from sam_viz.sparse_ops import calibrate_thresholds, install
from sam_viz.sparse_ops.policy import selection_mask, topk_indices

TEXT = "\n\n".join(
    f"Paragraph {i}: the {w} of the river crossed {i * 3} old bridges before the town woke up, and "
    f"nobody in the {w} market noticed the {i} boats."
    for i, w in enumerate(["morning", "fog", "cold", "light", "smoke", "song", "rain", "noise", "mist", "wind"]))
CONTEXT = 16
pytestmark = pytest.mark.usefixtures("one_thread")


def _table(root, manifest, name):
    return pq.read_table(root / manifest["id"] / f"{name}.parquet").to_pandas()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    """tiny-opt (ReLU) with neuron 5 of layer 0 dead (h = relu(-1) = 0) and neuron 7 always large."""
    loaded = load_model("tiny-opt")
    fc1 = loaded.model.model.decoder.layers[0].fc1
    with torch.no_grad():
        fc1.weight[5] = 0.0
        fc1.bias[5] = -1.0
        fc1.weight[7] = 0.0
        fc1.bias[7] = 100.0
    path = tmp_path_factory.mktemp("models") / "opt-dead"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def _windows(tokenizer, docs):
    """The documents' tokens, concatenated and cut into windows of CONTEXT: [W, CONTEXT], doc and pos [W * CONTEXT]."""
    ids, doc, pos = [], [], []
    for d, text in enumerate(docs):
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        doc += [d] * len(t)
        pos += list(range(len(t)))
    n = len(ids) // CONTEXT * CONTEXT
    return torch.tensor(ids[:n]).view(-1, CONTEXT), np.array(doc[:n]), np.array(pos[:n])


def _by_hand(path, docs):
    """h of every layer on the corpus' windows, from a fresh copy of the model and plain forward hooks."""
    model = load_model(str(path))
    windows, doc, pos = _windows(model.tokenizer, docs)
    blocks = model.model.model.decoder.layers
    hs = {i: [] for i in range(len(blocks))}                    # h = the input of fc2, [B * T, d_ff]

    def keep(i):
        return lambda module, args: hs[i].append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [layer.fc2.register_forward_pre_hook(keep(i)) for i, layer in enumerate(blocks)]
    try:
        with torch.no_grad():
            for b in range(0, len(windows), 16):
                model.model(input_ids=windows[b:b + 16])
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in hs.items()}, doc, pos, model.token_strings(windows.reshape(-1))


def test_firing_dead_and_top_contexts_match_a_computation_by_hand(tmp_path, corpus_file, opt_dir, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(opt_dir.parent))
    density = 0.75                                 # k = 96 of 128: more than the positive h of most tokens
    manifest = build_profile(str(opt_dir), str(corpus_file), density=density, context=CONTEXT, root=tmp_path)
    hs, doc, pos, strings = _by_hand(opt_dir, TEXT.split("\n\n"))
    assert manifest["tokens"] == len(doc)
    neurons, layers, examples = (_table(tmp_path, manifest, n) for n in ("neurons", "layers", "examples"))
    for layer, h in hs.items():
        k = round(density * h.shape[1])
        order = torch.sort(h.abs(), dim=1, descending=True, stable=True).indices[:, :k]
        in_top = torch.zeros_like(h, dtype=torch.bool).scatter_(1, order, True)
        fire = (in_top & (h > 0)).sum(0).numpy()
        rows = neurons[neurons.layer == layer].sort_values("neuron")
        assert (rows.fire_count.to_numpy() == fire).all()
        assert np.allclose(rows.sum_abs.to_numpy(), h.abs().sum(0).double().numpy(), rtol=1e-6)
        row = layers[layers.layer == layer].iloc[0]
        assert row.dead == int((fire == 0).sum()) and row.always_on == int((fire == len(doc)).sum())
        for j in range(h.shape[1]):
            a = h[:, j].abs().numpy()
            want = sorted((t for t in range(len(doc)) if a[t] > 0), key=lambda t: (-a[t], doc[t], pos[t]))[:20]
            got = examples[(examples.layer == layer) & (examples.neuron == j) & (examples.band == "top")]
            got = got.sort_values("rank")
            assert list(zip(got.doc, got.pos)) == [(doc[t], pos[t]) for t in want]
            assert np.allclose(got.value.to_numpy(), h[want, j].double().numpy(), rtol=1e-6)
    assert set(examples.band) > {"top"}
    for ex in examples[examples.band != "top"].itertuples():            # quantile samples: h and band by hand
        t = int(np.flatnonzero((doc == ex.doc) & (pos == ex.pos))[0])
        h_t, top = float(hs[ex.layer][t, ex.neuron]), float(hs[ex.layer][:, ex.neuron].abs().max())
        assert ex.value == pytest.approx(h_t, rel=1e-6)
        assert ex.band == f"q{min(4, int(abs(h_t) / top * 5))}"
    first = neurons[neurons.layer == 0].set_index("neuron")
    assert first.fire_count[5] == 0 and first.fire_count[7] == len(doc)
    assert layers.dead[0] >= 1 and layers.always_on[0] >= 1
    for ex in examples[examples.band == "top"].head(50).itertuples():    # the firing token, ±8 in its document
        t = int(np.flatnonzero((doc == ex.doc) & (pos == ex.pos))[0])
        assert ex.tokens[ex.focus] == strings[t] and len(ex.tokens) <= 17
        assert list(ex.tokens[:ex.focus]) == [strings[u] for u in range(t - ex.focus, t)]


def test_threshold_selection_recall_and_precision_of_layer_0_match_a_computation_by_hand(tmp_path, corpus_file):
    manifest = build_profile("tiny-llama", str(corpus_file), policy="threshold", density=0.25, context=CONTEXT,
                             root=tmp_path)
    fresh = load_model("tiny-llama")
    install(fresh)                                                  # calibration runs through the wrappers
    t0 = calibrate_thresholds(fresh, 0.25)[0]                       # the policy's input: layer 0's threshold
    windows, doc, _ = _windows(fresh.tokenizer, TEXT.split("\n\n"))
    mlp, xs = fresh.model.model.layers[0].mlp.dense, []             # the model's own LlamaMLP
    hook = mlp.register_forward_pre_hook(lambda module, args: xs.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            fresh.model(input_ids=windows)
            x = torch.cat(xs)
            selected = mlp.act_fn(mlp.gate_proj(x)).abs() > t0                # CATS: |act(W_gate x)| > t
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    finally:
        hook.remove()
    k = round(0.25 * h.shape[1])
    hits = int(selection_mask(topk_indices(h, k), h.shape[1]).logical_and(selected).sum())
    neurons, layers = _table(tmp_path, manifest, "neurons"), _table(tmp_path, manifest, "layers")
    assert (neurons[neurons.layer == 0].sort_values("neuron").select_count.to_numpy() == selected.sum(0).numpy()).all()
    row = layers.iloc[0]
    assert row.density == pytest.approx(float(selected.sum()) / selected.numel(), rel=1e-9)
    assert row.recall == pytest.approx(hits / (len(doc) * k), rel=1e-9)
    assert row.precision == pytest.approx(hits / float(selected.sum()), rel=1e-9)
    assert 0 < row.recall < 1


def _assert_same(a: Partial, b: Partial) -> None:
    for name, x in vars(a).items():
        y = getattr(b, name)
        if x.dtype.kind == "f":
            assert np.allclose(x, y, rtol=1e-6, atol=1e-9), name
        else:
            assert np.array_equal(x, y), name


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-mixtral"])
def test_a_profile_merged_from_two_halves_equals_the_whole(spec, monkeypatch):
    monkeypatch.setattr(corpus_mod, "SHARD_TOKENS", 64)
    settings = ProfileSettings(policy="topk", density=0.25, context=CONTEXT)
    mapper = ShardMapper(spec, settings)
    stream = tokenize(mapper.loaded, read_corpus("builtin:calibration"), CONTEXT, 512)
    shards = list(stream.shards())
    whole = run_local(mapper, shards)                                   # one pass, merged as it goes
    parts = [mapper(s) for s in shards]
    assert len(parts) == 8
    first, second = sum_partials(parts[:4]), sum_partials(parts[4:])
    _assert_same(first.merge(second), whole)
    _assert_same(second.merge(first), whole)
    _assert_same(sum_partials(parts[1::2]).merge(sum_partials(parts[::2])), whole)
    assert whole.nbytes() == Partial.empty(mapper.layout).nbytes() == first.nbytes()   # bounded: fixed shapes
    k = round(0.25 * mapper.loaded.d_ff)                                # the oracle's k at density 0.25
    assert whole.fire.sum() == 512 * k * max(1, mapper.loaded.experts_per_token) * mapper.loaded.n_layers
    assert (whole.top_key[..., 0] >= whole.top_key[..., -1]).all() and (first.top_key[..., -1] >= 0).all()


def test_oracle_mask_is_the_topk_set_with_ties_to_the_lower_index():
    a = torch.tensor([[1.0, 3, 3, 3, 0, 2], [0, 0, 0, 0, 0, 0], [5, 4, 4, 1, 4, 4]])
    for k in range(1, 7):
        assert torch.equal(oracle_mask(a, k), selection_mask(topk_indices(a, k), 6))


def test_interrupted_profile_is_not_listed_and_resume_gives_the_same_profile(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(corpus_mod, "SHARD_TOKENS", 64)
    monkeypatch.setattr(writer, "CHECKPOINT_S", 0.0)                  # a checkpoint after every shard
    kwargs = dict(density=0.5, context=CONTEXT, policy="topk")
    whole = build_profile("tiny-llama", str(corpus_file), root=tmp_path / "a", **kwargs)

    def stop(done, total, message):
        if done >= 3 * 64:
            raise KeyboardInterrupt

    root = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        build_profile("tiny-llama", str(corpus_file), root=root, progress=stop, **kwargs)
    assert [p.name for p in root.iterdir()] == [f".{whole['id']}.partial"]     # nothing listed
    assert json.loads((root / f".{whole['id']}.partial" / "checkpoint.json").read_text())["done"] == 3
    seen = []
    resumed = build_profile("tiny-llama", str(corpus_file), root=root, resume=True,
                            progress=lambda d, t, m: seen.append(d), **kwargs)
    assert resumed["id"] == whole["id"] and seen[0] == 4 * 64
    assert sorted(p.name for p in root.iterdir()) == [whole["id"]]
    for name in ("neurons", "layers", "examples", "cofire", "logits"):
        a, b = _table(tmp_path / "a", whole, name), _table(root, resumed, name)
        assert a.columns.tolist() == b.columns.tolist()
        for col in a.columns:
            if a[col].dtype.kind == "f":
                assert np.allclose(a[col], b[col], rtol=1e-6, equal_nan=True), (name, col)
            else:
                assert a[col].map(repr).tolist() == b[col].map(repr).tolist(), (name, col)


BAD = [
    (["--corpus", "{d}/missing.txt"], "does not exist"),
    (["--corpus", "{d}/binary.txt"], "binary"),
    (["--corpus", "{d}/empty.txt"], "holds no text"),
    (["--corpus", "{d}/rows.csv"], "its columns: title, body"),
    (["--corpus", "{d}/rows.jsonl", "--text-column", "txt"], "its columns: title, body"),
    (["--corpus", "{d}/short.txt"], "shorter than one context"),
    (["--corpus", "builtin:calibration", "--max-tokens", "5"], "max-tokens must be between"),
    (["--corpus", "builtin:calibration", "--max-tokens", "-3"], "positive whole number"),
    (["--corpus", "{d}/notes.docx"], "unknown format"),
    (["--corpus", "{d}/zero.txt"], "not a regular file"),              # a symlink to /dev/zero: read forever
    (["--corpus", "{d}/folder.txt"], "not a regular file"),
    (["--corpus", "{d}/a\x00b.txt"], "holds a NUL character"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_corpus_input_is_one_error_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_PROFILE_DIR", str(tmp_path / "profiles"))
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\x00\x01\xff")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "rows.csv").write_text("title,body\na,b\n")
    (tmp_path / "rows.jsonl").write_text('{"title": "a", "body": "b"}\n')
    (tmp_path / "short.txt").write_text("two words")
    (tmp_path / "notes.docx").write_text("x")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    (tmp_path / "folder.txt").mkdir()
    code = cli.main(["profile", "--model", "tiny-llama", *[a.format(d=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "profiles").exists() or not any((tmp_path / "profiles").iterdir())


def test_cli_profile_prints_the_manifest(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_PROFILE_DIR", str(tmp_path))
    code = cli.main(["profile", "--model", "tiny-bert", "--corpus", "builtin:calibration", "--max-tokens", "256",
                     "--context", "32", "--json"])
    out = capsys.readouterr()
    manifest = json.loads(out.out)
    assert code == 0 and manifest["tokens"] == 256 and manifest["kind"] == "encoder"
    assert (tmp_path / manifest["id"] / "manifest.json").is_file()
    assert not (tmp_path / manifest["id"] / "logits.parquet").exists()
    assert "tokens/s" in out.err


def test_corpus_sources_read_the_same_documents(tmp_path):
    docs = ["first doc", "second, with a comma", 'third "quoted"']
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    import pandas as pd

    pd.DataFrame({"text": docs}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"body": docs}).to_parquet(tmp_path / "c.parquet")
    hashes = set()
    for name, column in (("c.txt", None), ("c.jsonl", None), ("c.csv", None), ("c.parquet", "body")):
        corpus = read_corpus(str(tmp_path / name), column)
        assert corpus.documents == tuple(docs)
        hashes.add(corpus.hash)
    assert len(hashes) == 1
    with pytest.raises(InputError, match="its columns: body"):
        read_corpus(str(tmp_path / "c.parquet"))


def test_histogram_from_float_bits_matches_searchsorted_on_the_edges():
    """hist_counts reads bins off float32 exponents; the reference is np.searchsorted on HIST_EDGES
    (bins (-inf, e0), [e0, e1), ...), on every edge, its float32 neighbours, ±0 and far outside."""
    from sam_viz.profile.accumulate import hist_counts
    from sam_viz.profile.stats import HIST_EDGES

    edges = np.array(HIST_EDGES, dtype=np.float32)
    up, down = np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(-np.inf))
    extra = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 3e5, -3e5, 0.3, -0.3], dtype=np.float32)
    values = np.concatenate([edges, up, down, extra])
    h = torch.from_numpy(np.stack([values, values[::-1].copy()], axis=1))        # [n, 2 units]
    want = np.zeros((2, len(HIST_EDGES) + 1), dtype=np.int64)
    for unit in range(2):
        np.add.at(want[unit], np.searchsorted(edges, h[:, unit].numpy(), side="right"), 1)
    assert np.array_equal(hist_counts(h), want)
    rng = np.random.default_rng(0)                   # wide: counted in several blocks of rows
    wide = (rng.standard_normal((300, 2048)) * 2.0 ** rng.integers(-12, 9, (300, 2048))).astype(np.float32)
    wide[::7, ::5] = rng.choice(values, size=wide[::7, ::5].shape)
    bins = np.searchsorted(edges, wide, side="right")
    want = np.stack([np.bincount(bins[:, unit], minlength=len(HIST_EDGES) + 1) for unit in range(2048)])
    assert np.array_equal(hist_counts(wide), want)


def test_top_examples_under_ties_are_the_largest_abs_h_then_the_lower_doc_and_pos():
    """Top lists built over calls of 10 (fewer than TOP), 45 and 35 rows, with |h| tied everywhere and
    (doc, pos) not in row order, against one sort of all tokens by (-|h|, doc, pos)."""
    from sam_viz.profile.accumulate import ShardStats
    from sam_viz.profile.stats import EMPTY, TOP, Layout

    rng = np.random.default_rng(1)
    n, d = 90, 6
    perm = rng.permutation(n)
    doc, pos = perm // 10, perm % 10
    h = rng.integers(-3, 4, (n, d)).astype(np.float32)
    stats = ShardStats(Layout(1, d), doc, pos)
    for a, b in ((0, 10), (10, 55), (55, 90)):
        stats.observe(0, torch.arange(a, b), torch.from_numpy(h[a:b]), 0, 2, False)
    p = stats.partial()
    for j in range(d):
        want = sorted((t for t in range(n) if h[t, j] != 0), key=lambda t: (-abs(h[t, j]), doc[t], pos[t]))[:TOP]
        m = len(want)
        assert list(zip(p.top_doc[0, j, :m], p.top_pos[0, j, :m])) == [(doc[t], pos[t]) for t in want]
        assert np.array_equal(p.top_val[0, j, :m], h[want, j]) and np.array_equal(p.top_key[0, j, :m], abs(h[want, j]))
        assert (p.top_doc[0, j, m:] == EMPTY).all() and (p.top_key[0, j, m:] == -1).all()


def test_oracle_with_many_ties_is_the_topk_set_with_ties_to_the_lower_index():
    from sam_viz.profile.accumulate import oracle

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (64, 24), generator=gen).float()                      # ties everywhere
    a[::3] += torch.rand(22, 24, generator=gen)                                    # and rows without
    for k in (0, 1, 5, 12, 23, 24):
        mask, values = oracle(a.numpy(), k)
        want = selection_mask(topk_indices(a, k), 24) if k else torch.zeros_like(a, dtype=torch.bool)
        assert torch.equal(torch.from_numpy(mask), want)
        assert np.array_equal(np.sort(values, axis=1), np.sort(a.numpy()[mask].reshape(64, k), axis=1))


def test_state_of_a_7b_shape_stays_under_1_2_gb():
    """Partial's size is linear in the layers (fixed shapes); 32 layers x 11,008 units (a 7B
    model) was 1.61 GB with the sample hashes stored and 64-bit values."""
    from sam_viz.profile.stats import Layout

    one, two = (Partial.empty(Layout(n, 11_008)).nbytes() for n in (1, 2))
    assert one + 31 * (two - one) < 1.2e9


def test_a_checkpoint_of_another_state_layout_is_refused_not_misread():
    """A checkpoint written before sample hashes left the state (an smp_hash field, empty sample
    slots with doc 0) must not load as samples of doc 0: from_bytes refuses it, so a resume starts over."""
    import io

    from sam_viz.profile.stats import Layout

    p = Partial.empty(Layout(1, 8))
    assert vars(Partial.from_bytes(p.to_bytes())).keys() == vars(p).keys()
    buf = io.BytesIO()
    np.savez(buf, **vars(p), smp_hash=np.zeros_like(p.smp_doc))
    with pytest.raises(ValueError):
        Partial.from_bytes(buf.getvalue())
