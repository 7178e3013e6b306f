"""demo-lm-all (issue 23), shipped in models/demo/demo-lm-all: trained with top-k on every projection's
input at 0.4 (tools/topk_all.py). The app's whole-model topk at 0.4 computes its training wrapper's
logits, and `eval` on the first tokens of the held-out split reproduces the number its card states."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sam_viz.evaluate import EvalSpec, evaluate
from sam_viz.models import load_model
from sam_viz.models.loading import DEMO_DIR
from sam_viz.sparse_ops import Policy, default_kernel, sparsified
from tools import model_card, topk_all

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "The :func:`open` function returns a file object, which can be read with a for loop over its lines."


def test_the_apps_whole_model_topk_runs_it_as_its_training_wrapper_did():
    loaded = load_model("demo-lm-all")
    trained = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "demo-lm-all").float().eval()
    for w in topk_all.install(trained):
        w.density = 0.4
    enc = loaded.encode(TEXT)
    with torch.no_grad():
        want = trained(input_ids=enc["input_ids"]).logits
        for kernel in ("reference", "cpu") if default_kernel() == "cpu" else ("reference",):
            with sparsified(loaded, Policy("topk", 0.4, scope="all"), kernel=kernel):
                got = loaded.model(**enc).logits.float()
            assert (got - want).abs().max() <= 1e-4, kernel
        dense = loaded.model(**enc).logits.float()
    assert (dense - want).abs().max() > 1e-2            # the masks matter: the comparison can tell


def test_eval_on_a_prefix_reproduces_the_cards_number():
    evals = json.loads((DEMO_DIR / "training" / "eval-all.json").read_text())
    card = (DEMO_DIR / "demo-lm-all" / "README.md").read_text()
    loaded = load_model("demo-lm-all")
    for row in evals["prefix"]:
        spec = EvalSpec(model="demo-lm-all", policy=row["policy"], density=row["density"], scope=row["scope"],
                        max_tokens=model_card.PREFIX_TOKENS)
        got = evaluate(loaded, spec).perplexity
        assert math.isclose(got, row["perplexity"], rel_tol=1e-5), (row["policy"], got, row["perplexity"])
        assert f"{row['perplexity']:.6f}" in card
    for row in evals["full"]:
        assert f"{row['perplexity']:.4f}" in card
