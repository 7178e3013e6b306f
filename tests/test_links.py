"""Links are safe (issue 15): no model spec (CLI flag or URL param) reads a path outside the allowed
roots, turns on remote code or unpickles; text from a prompt or a token is escaped in every export
(CSV cells that a spreadsheet would read as a formula get a leading apostrophe; HTML shows markup as
text; JSON round-trips)."""
import csv
import html
import io
import json
import shutil
from html.parser import HTMLParser

import pytest
from streamlit.testing.v1 import AppTest

from conftest import shared
from sam_viz.models import InputError, load_model
from sam_viz import RunSpec, analyze
from sam_viz.export import csv_text, to_csv, to_html, to_json
from sam_viz.report import report_plots
from test_app import ROOT
from test_model_errors import good_checkpoint  # noqa: F401 - the fixture: a small Llama checkpoint folder

XSS = '<img src=x onerror=alert(1)></script><script>alert(2)</script> =HYPERLINK("http://x") -2+3 @SUM(A1)'


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """An allowed root and, beside it, a folder outside it."""
    inside, outside = tmp_path / "allowed", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(inside))
    return inside, outside


def test_a_checkpoint_under_the_root_loads(roots, good_checkpoint):  # noqa: F811
    inside, _ = roots
    shutil.copytree(good_checkpoint, inside / "m")
    assert load_model(str(inside / "m")).kind == "causal-lm"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlinked-dir", "symlinked-weights", "symlinked-config"])
def test_no_spec_reads_outside_the_roots(roots, good_checkpoint, how):  # noqa: F811
    inside, outside = roots
    shutil.copytree(good_checkpoint, outside / "m")
    spec = {"absolute": str(outside / "m"), "dotdot": str(inside / ".." / "outside" / "m")}.get(how)
    if how == "symlinked-dir":
        (inside / "m").symlink_to(outside / "m")
    elif how.startswith("symlinked-"):
        shutil.copytree(good_checkpoint, inside / "m")
        name = "model.safetensors" if how == "symlinked-weights" else "config.json"
        (inside / "m" / name).unlink()
        (inside / "m" / name).symlink_to(outside / "m" / name)
    with pytest.raises(InputError, match="outside the allowed roots"):
        load_model(spec or str(inside / "m"))


@pytest.mark.parametrize("name", ["hf:../../x", "hf:a/b/c", "hf:/etc/passwd", "hf:a/..", "hf:..", "hf:a/b/../c",
                                  "hf:~/x", "hf:a\\b/c"])
def test_hf_names_with_path_parts_are_refused(name):
    with pytest.raises(InputError, match="not a valid Hugging Face model name"):
        load_model(name)


def test_remote_code_stays_off_and_nothing_is_unpickled(roots, good_checkpoint, tmp_path):  # noqa: F811
    """A checkpoint whose config asks for its own modeling code and that ships a pickle which would
    leave a marker file when loaded: it loads with transformers' own Llama, and no marker appears."""
    import pickle

    inside, _ = roots
    path = inside / "m"
    shutil.copytree(good_checkpoint, path)
    marker = tmp_path / "ran"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "modeling_evil.EvilConfig"}
    (path / "config.json").write_text(json.dumps(config))

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    loaded = load_model(str(path))
    assert type(loaded.model).__module__.startswith("transformers.") and not marker.exists()
    (path / "model.safetensors").unlink()                     # only the pickle left: refused
    with pytest.raises(InputError, match="no safetensors"):
        load_model(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("model,words", [("hf:a/b/c", "not a valid Hugging Face model name"),
                                         ("/etc", "outside the allowed roots")])
def test_a_link_with_a_bad_model_is_one_error(roots, model, words, monkeypatch, tmp_path):
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=240)
    at.query_params.update(model=model, prompt="One two.")
    at.run()
    assert not at.exception and len(at.error) == 1 and words in at.error[0].value


def test_a_visitor_is_told_what_is_allowed_without_the_servers_folders(roots, monkeypatch, tmp_path):
    """?model=../../etc: one sentence saying what may be loaded, with no folder of the server and no
    advice to set its environment; the sidebar names the allowed roots without the server's paths."""
    from sam_viz import allowed_roots

    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=240)
    at.query_params.update(model="../../etc", prompt="One two.")
    at.run()
    assert not at.exception and len(at.error) == 1
    said = html.unescape(at.error[0].value).replace("\\", "")        # as the page shows it
    assert "outside the allowed roots" in said and "hf:org/name" in said and "SAM_VIZ_MODEL_ROOTS" not in said
    caption = next(c.value for c in at.caption if c.value.startswith("Allowed roots"))
    for text in (said, caption):
        assert not any(str(r) in text for r in allowed_roots()) and str(ROOT) not in text, text
    assert caption == "Allowed roots: `allowed`, `models/demo`"       # the root's name; the demo folder, relative


def test_the_cli_tells_the_operator_the_folders_and_the_setting(roots, capsys):
    from sam_viz.cli import main

    inside, _ = roots
    assert main(["analyze", "--model", "../../etc", "--prompt", "One two."]) == 2
    err = capsys.readouterr().err
    assert "outside the allowed roots" in err and str(inside) in err and "set SAM_VIZ_MODEL_ROOTS" in err


@pytest.fixture(scope="module")
def hostile():
    """An analysis whose prompt and tokens hold markup and formula starts (=, +, -, @)."""
    return analyze(shared("tiny-llama"), RunSpec(prompt=XSS, model="tiny-llama", policy="topk", density=0.5,
                                                 kernel="reference"))


def test_csv_text_cells_never_start_a_formula(hostile):
    rows = list(csv.DictReader(io.StringIO(to_csv(hostile))))
    assert len(rows) == hostile.n_layers * len(hostile.tokens)
    starts = {r["token"][:1] for r in rows}
    assert not starts & set("=+-@\t\r")
    formulas = [t for t in hostile.tokens if t[:1] in "=+-@"]
    assert {"=", "-", "+", "@"} <= {t[:1] for t in formulas}       # the prompt did produce such tokens
    for r in rows:
        token = hostile.tokens[int(r["token_index"])]
        assert r["token"] == ("'" + token if token in formulas else token)
        for col in ("selected", "possible", "density", "mass_kept_share"):
            float(r[col])                                           # numbers stay numbers


def test_csv_text_keeps_text_that_is_no_formula():
    assert [csv_text(t) for t in ("-1", "=A1", "@x", "+", "\tx", "\rx", "a-b", "1", "")] == \
        ["'-1", "'=A1", "'@x", "'+", "'\tx", "'\rx", "a-b", "1", ""]


class _Tags(HTMLParser):
    """Start tags, attribute names, and the first characters of each script."""
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.scripts = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]

    def handle_data(self, data):
        if self.tags and self.tags[-1] == "script" and len(self.scripts) < self.tags.count("script"):
            self.scripts.append(data.strip()[:40])


def test_html_export_shows_markup_as_text(hostile):
    plots = report_plots(hostile)
    page = to_html(hostile, plots)
    parser = _Tags()
    parser.feed(page)
    assert "img" not in parser.tags and "onerror" not in parser.attrs
    assert parser.tags.count("script") == len(plots) + 2            # plotly.js (config, library), one per figure
    assert all(s.startswith(("window.PlotlyConfig", "/**", "window.PLOTLYENV")) for s in parser.scripts)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_json_export_round_trips_the_text(hostile):
    doc = json.loads(to_json(hostile))
    assert doc["spec"]["prompt"] == XSS and doc["tokens"] == hostile.tokens
