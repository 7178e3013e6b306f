"""Long prompts (issue 15): the longest prompt (sam_viz.models.loading.MAX_TOKENS) on a model with a wide MLP
(d_ff 4096): the firing trace stays within TRACE_BYTES_PER_SELECTED per computed neuron (stated in
README's Limits), every figure within the plots' cell budget, and the page answers; a prompt over
the limit is one sentence saying the limit, in the CLI and the app, also when a link carries more
characters than the prompt box takes."""
import time

import pytest
from streamlit.testing.v1 import AppTest

import sam_viz.figures.firing as P
from sam_viz.models import load_model
from sam_viz.models.loading import MAX_TOKENS, minilm_path
from sam_viz import RunSpec, analyze
from sam_viz.analysis import truncate_to_tokens
from sam_viz.report import report_plots
from sam_viz.spec import MAX_PROMPT_CHARS
from test_app import ROOT
from test_hardening_cli import run_cli
from test_plots import count_cells

D_FF = 4096
TRACE_BYTES_PER_SELECTED = 6        # an int16 / int32 id and an fp16 value per computed neuron ...
TRACE_BYTES_PER_TOKEN_LAYER = 64    # ... and a few per-token counters (README, Limits)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A Llama checkpoint with hidden 64, d_ff 4096, 2 layers, and minilm's tokenizer; loaded."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=D_FF, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(root / "wide", safe_serialization=True)
    tokenizer.save_pretrained(root / "wide")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAM_VIZ_MODEL_ROOTS", str(root))
    yield str(root / "wide"), load_model(str(root / "wide"))
    mp.undo()


@pytest.fixture(scope="module")
def longest(wide):
    spec, loaded = wide
    prompt = truncate_to_tokens(loaded, "The lighthouse keeper counted ships all night. " * 120, MAX_TOKENS)
    assert loaded.encode(prompt)["input_ids"].shape[1] == MAX_TOKENS
    return prompt


def test_the_longest_prompt_keeps_the_trace_and_figures_bounded(wide, longest):
    spec, loaded = wide
    a = analyze(loaded, RunSpec(prompt=longest, model=spec, policy="topk", density=0.5, kernel="reference"))
    assert len(a.tokens) == MAX_TOKENS and a.d_ff == D_FF
    selected = sum(int(l.selected.sum()) for l in a.layers)
    assert selected == MAX_TOKENS * a.n_layers * round(0.5 * D_FF)        # topk: exactly k per token
    bound = selected * TRACE_BYTES_PER_SELECTED + MAX_TOKENS * a.n_layers * TRACE_BYTES_PER_TOKEN_LAYER
    assert a.trace_nbytes() <= bound
    for title, plot in report_plots(a):
        assert count_cells(plot.fig) <= P.MAX_CELLS, title


def test_the_page_answers_on_the_longest_prompt(wide, longest, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    spec, _ = wide
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=600)
    at.query_params.update(model=spec, prompt=longest, kernel="reference")
    start = time.perf_counter()
    at.run()
    with capsys.disabled():
        print(f"\nfiring page, {MAX_TOKENS} tokens, d_ff {D_FF}: {time.perf_counter() - start:.1f} s")
    assert not at.exception and not at.error
    assert len(at.session_state["ctx"].analysis.tokens) == MAX_TOKENS and len(at.get("plotly_chart")) >= 3


def test_one_token_over_the_limit_is_one_sentence(wide, longest, tmp_path, monkeypatch):
    spec, loaded = wide
    over = longest + " ships"
    assert loaded.encode(over)["input_ids"].shape[1] > MAX_TOKENS
    rc, out, err = run_cli(["analyze", "--model", spec, "--prompt", over])
    assert rc == 2 and err.count("\n") == 1 and f"the limit for {spec} is {MAX_TOKENS}" in err
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=600)
    at.query_params.update(model=spec, prompt=over)
    at.run()
    assert not at.exception and len(at.error) == 1 and f"is {MAX_TOKENS}" in at.error[0].value


def test_a_link_longer_than_the_prompt_box_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=600)
    at.query_params.update(model="tiny-llama", prompt="ab " * 10_000)
    at.run()
    assert not at.exception
    said = " ".join(e.value for e in [*at.error, *at.warning])
    assert f"{MAX_PROMPT_CHARS:,}" in said and "30,000" in said


def test_the_work_a_link_can_ask_for_is_bounded():
    """README's Limits: continuation length, attribution steps and query, timing rounds, prompt size."""
    from conftest import shared
    from sam_viz.models import InputError
    from sam_viz import greedy_continuation
    from sam_viz.attribution import MAX_QUERY_CHARS, MAX_STEPS, attribute
    from sam_viz.explore import MAX_CONTINUATION
    from sam_viz.speed import MAX_ROUNDS, time_forward

    loaded = shared("tiny-llama")
    spec = RunSpec(prompt="One two three.", model="tiny-llama", policy="topk", density=0.5, kernel="reference")
    out = greedy_continuation(loaded, spec, n_new=10**9)
    assert len(out["dense"]) == len(out["sparse"]) == MAX_CONTINUATION == 64
    assert time_forward(loaded, spec, rounds=10**9, warmup=0)["rounds"] == MAX_ROUNDS == 50
    for steps in (MAX_STEPS + 1, 10**9, 1):
        with pytest.raises(InputError, match=f"from 2 to {MAX_STEPS}"):
            attribute(loaded, spec, method="ig", steps=steps)
    with pytest.raises(InputError, match="limit"):
        attribute(shared("tiny-bert"), RunSpec(prompt="One two.", model="tiny-bert", kernel="reference"),
                  method="ixg", query="q" * (MAX_QUERY_CHARS + 1))
    with pytest.raises(InputError, match=f"{MAX_PROMPT_CHARS:,}"):
        RunSpec(prompt="x" * (MAX_PROMPT_CHARS + 1), model="tiny-llama")
