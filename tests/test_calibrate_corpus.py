"""Calibration from a corpus (issue 14): `calibrate --corpus` reads the corpus with the profile's
reader; the static counts and thresholds it stores are recomputed by hand from a fresh model's
activations on the same windows; bad input is one error line and exit 2."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_viz.models import load_model
from sam_viz import cli
from sam_viz.sparse_ops import calibration
from sam_viz.sparse_ops.calibration import GRID, Settings, calibrate

TEXT = "\n\n".join(f"Note {i}: the {w} train left the {w} station at {i} past nine, and the driver waved to "
                   f"the {i * 7} people on the platform before the long tunnel."
                   for i, w in enumerate(["red", "slow", "night", "mail", "coal", "last", "early", "river"] * 3))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    return path


def _h_and_gate(spec: str, windows: torch.Tensor):
    """Layer by layer, h (the input of down_proj) and |act(gate x)|, from plain hooks on a fresh model."""
    model = load_model(spec).model
    h, gate = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        hooks.append(mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: h.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(mlp.gate_proj.register_forward_hook(lambda m, a, out, i=i, act=mlp.act_fn: gate.setdefault(
            i, []).append(act(out).abs().reshape(-1, out.shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=windows)
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(v) for i, v in h.items()}, {i: torch.cat(v) for i, v in gate.items()}


def test_corpus_calibration_counts_and_thresholds_match_the_activations(corpus_file):
    loaded = load_model("tiny-llama")
    ids = np.concatenate([loaded.plain_ids(t) for t in TEXT.split("\n\n")])
    windows = torch.from_numpy(ids[: len(ids) // 32 * 32].reshape(-1, 32))          # 32-token windows
    cal = calibrate(loaded, Settings(steps=2), windows=windows, corpus={"source": str(corpus_file)})
    h, gate = _h_and_gate("tiny-llama", windows)
    assert cal.n_tokens == windows.numel() and cal.corpus == {"source": str(corpus_file)}
    for layer, hl in h.items():
        d_ff = hl.shape[1]
        for row, g in enumerate(GRID):                                 # tokens with neuron j in their top-k
            k = max(1, round(g * d_ff))
            top = hl.abs().argsort(dim=1, descending=True, stable=True)[:, :k]
            assert torch.equal(cal.counts[(layer, -1)][row].long(), torch.bincount(top.flatten(), minlength=d_ff))
    for g in (0.1, 0.5):                                               # layer 0 sees the dense input
        share = float((gate[0] > cal.thresholds[g][0]).float().mean())
        assert abs(share - g) < 0.01, (g, share)


def test_cli_calibrate_corpus_stores_the_corpus_calibration(corpus_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_CACHE_DIR", str(tmp_path / "cache"))
    code = cli.main(["calibrate", "--model", "tiny-llama", "--corpus", str(corpus_file), "--max-tokens", "256"])
    out = capsys.readouterr().out
    assert code == 0 and f"calibrated on {corpus_file} (256 tokens)" in out, out
    stored = calibration.load(calibration.path_for(load_model("tiny-llama")))
    assert stored.n_tokens == 256 and stored.corpus["source"] == str(corpus_file)
    assert stored.corpus["hash"] and len(stored.thresholds) == len(GRID)


@pytest.mark.parametrize("args, message", [
    (["--text-column", "body"], "--text-column and --max-tokens are for --corpus"),
    (["--corpus", "{tmp}/missing.txt"], "does not exist"),
    (["--corpus", "{tmp}/notes.txt", "--max-tokens", "3"], "max-tokens must be between"),
    (["--corpus", "{tmp}/short.txt"], "shorter than one context"),
    (["--corpus", "{tmp}/notes.csv", "--text-column", "body"], "has no column 'body'; its columns: title, text"),
])
def test_calibrate_corpus_bad_input_is_one_error_line_and_exit_2(args, message, corpus_file, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("SAM_VIZ_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "short.txt").write_text("a few words")
    (tmp_path / "notes.csv").write_text("title,text\none,some text\n")
    code = cli.main(["calibrate", "--model", "tiny-llama", *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "cache").exists()                           # nothing stored
