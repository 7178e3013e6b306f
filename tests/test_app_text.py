"""AppTest: text from the prompt, the model, a checkpoint path or the link reaches the screen as
text on every page: no markdown element would turn on Streamlit's LaTeX, and where such text is
shown, a CommonMark renderer shows it literally (tests/test_text.py holds the references)."""
import pytest

from sam_viz.models.tiny import tiny_config
from test_app import PAGES, open_app
from test_text import PROMPT, markdown, shown_literally

LABELLED = ("expander", "status", "button", "download_button", "selectbox", "number_input", "radio",
            "text_area", "text_input", "slider", "checkbox", "toggle")
BODIES = ("markdown", "caption", "info", "warning", "error", "success", "toast", "title", "header", "subheader")


@pytest.fixture(autouse=True)
def run_db(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))


def markdown_sources(at) -> list[str]:
    """Every string the page hands to Streamlit's markdown: bodies, labels, metric values, radio options."""
    out = [el.value for kind in BODIES for el in at.get(kind)]
    out += [text for m in at.metric for text in (m.label, m.value, m.delta) if text]
    for kind in LABELLED:
        out += [el.label for el in at.get(kind)]
    out += [option for radio in at.radio for option in radio.options]
    return [s for s in out if isinstance(s, str)]


def shown(at) -> list[str]:
    """What a reader sees of each markdown source; each checked against LaTeX, directives and emoji."""
    return [shown_literally(s) for s in markdown_sources(at)]


@pytest.mark.parametrize("model", ["minilm", "tiny-llama"])
@pytest.mark.parametrize("page", list(PAGES))
def test_prompt_text_is_shown_literally_on_every_page(page, model):
    at = open_app(page, model=model, prompt=PROMPT, policy="topk", density="0.5")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    tokens = " ".join(at.session_state["ctx"].analysis.tokens)
    assert "$" in tokens and "*" in tokens and "[" in tokens
    with_prompt = [text for text in shown(at) if "shirt" in text]
    assert all(tokens in text or PROMPT in text for text in with_prompt), with_prompt
    if page == "attribution":                               # three coloured rows: dense, sparse, difference
        assert len(with_prompt) == 3


def test_continuation_reads_as_text_with_its_first_difference_marked():
    at = open_app("compare", model="tiny-llama", prompt=PROMPT, density="0.1")
    next(b for b in at.button if b.label == "Continue with both models").click().run()
    assert not at.exception and not at.error
    cont = at.session_state["ctx"].analysis.continuation
    first = cont["first_divergence"]
    assert first is not None                                     # density 0.1 parts the two models
    rows = {s.split("**")[1]: s for s in markdown_sources(at) if s.startswith(("**Dense:**", "**Sparse:**"))}
    for name in ("dense", "sparse"):
        source = rows[f"{name.capitalize()}:"]
        text = shown_literally(source)
        assert text == (f"{name.capitalize()}: " + "".join(cont[name])).strip() and "##" not in text
        assert markdown(source).marked == [cont[name][first]]


@pytest.fixture
def odd_checkpoint(tmp_path, monkeypatch):
    """tiny-llama saved as a checkpoint under a directory name full of markdown signs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sam_viz.models.loading import minilm_path

    path = tmp_path / "ck $a *x* _y_ $b [l](u)"
    tok = AutoTokenizer.from_pretrained(minilm_path())
    AutoModelForCausalLM.from_config(tiny_config("tiny-llama", tok)).save_pretrained(path)
    tok.save_pretrained(path)
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    return str(path)


def test_checkpoint_path_is_shown_literally(odd_checkpoint):
    at = open_app("firing", model=odd_checkpoint, prompt=PROMPT)
    assert not at.exception and not at.error, [e.value for e in at.error]
    texts = shown(at)
    assert any(t.startswith(odd_checkpoint + " · topk at density 0.5") for t in texts), texts


@pytest.mark.parametrize("params,kind,quoted", [
    (dict(model="$a$ *b* :red[c]"), "error", "'$a$ *b* :red[c]'"),
    (dict(model="tiny-llama", policy="$p$ _q_"), "warning", "'$p$ _q_'"),
    (dict(run="$r$ `s`"), "error", "'$r$ `s`'"),
])
def test_link_values_quoted_in_messages_are_shown_literally(params, kind, quoted):
    at = open_app(prompt="One two three.", **params)
    assert not at.exception, at.exception
    messages = [shown_literally(el.value) for el in at.get(kind)]
    assert any(quoted in m for m in messages), messages
