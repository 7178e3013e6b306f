"""The demo-LM training script (tools/train_demo.py) on a tiny Llama and a few sentences.

TopKMLP against the equation written here by hand: h = silu(W_gate x) * (W_up x), all but the
k = round(density * d_ff) largest abs(h_j) per token set to 0, y = W_down h; and against the app's
own `topk` policy on the exported checkpoint (so training computes what inference computes).
"""
import dataclasses
import json
import math
import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from tools import demo_data, topk_mlp, train_demo

SENTENCES = [
    "The list type is a mutable sequence; lists may be constructed with square brackets.",
    "To open a file, call open() with its name and a mode such as 'r' for reading.",
    "The for statement iterates over the items of any sequence, in the order they appear.",
    "A dictionary maps hashable keys to arbitrary values and is written with curly braces.",
    "When an exception is raised, the interpreter looks for a handler in the enclosing try.",
    "Strings are immutable sequences of Unicode code points, written in quotes.",
    "The with statement wraps a block with methods defined by a context manager.",
    "A module is a file containing Python definitions and statements.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _by_hand(mlp: LlamaMLP, x: torch.Tensor, k: int) -> torch.Tensor:
    w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    h = torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)                # [N, d_ff]
    out = torch.zeros_like(x)
    for n in range(h.shape[0]):                                              # one token at a time
        kept = sorted(range(h.shape[1]), key=lambda j: (-abs(h[n, j].item()), j))[:k]
        out[n] = w_down[:, kept] @ h[n, kept]
    return out


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.01])
def test_topk_mlp_matches_the_masked_equation(density):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act="silu")
    mlp = LlamaMLP(cfg)
    wrapped = topk_mlp.TopKMLP(mlp)
    wrapped.density = density
    x = torch.randn(7, 16)
    k = max(1, round(density * 40))
    with torch.no_grad():
        assert torch.allclose(wrapped(x), _by_hand(mlp, x, k), atol=1e-6)
        assert torch.allclose(wrapped(x.view(1, 7, 16)), wrapped(x).view(1, 7, 16))


def test_topk_mlp_gradient_flows_only_through_kept_neurons():
    torch.manual_seed(1)
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=20, num_attention_heads=2, hidden_act="silu"))
    wrapped = topk_mlp.TopKMLP(mlp)
    wrapped.density = 0.1                                                    # k = 2
    x = torch.randn(1, 8)
    wrapped(x).sum().backward()
    h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    kept = set(h.abs().topk(2).indices[0].tolist())
    touched = {j for j in range(20) if mlp.down_proj.weight.grad[:, j].abs().sum() > 0}
    assert touched == kept
    assert {j for j in range(20) if mlp.gate_proj.weight.grad[j].abs().sum() > 0} == kept


def test_schedules_follow_their_equations():
    steps, target = 1000, 0.1
    assert topk_mlp.sparsity_schedule(0, steps, target) == 1.0
    assert topk_mlp.sparsity_schedule(49, steps, target) == 1.0                # dense for 5%
    mid = 50 + (300 - 50) / 2                                                # halfway in log space
    assert math.isclose(topk_mlp.sparsity_schedule(mid, steps, target), math.sqrt(target), rel_tol=1e-9)
    assert topk_mlp.sparsity_schedule(300, steps, target) == target
    assert topk_mlp.sparsity_schedule(999, steps, target) == target
    assert math.isclose(topk_mlp.lr_schedule(9, steps, 1e-3, 10), 1e-3)
    assert math.isclose(topk_mlp.lr_schedule(steps, steps, 1e-3, 10), 1e-4)    # cosine to 10%
    assert math.isclose(topk_mlp.lr_schedule(505, steps, 1e-3, 10), 1e-3 * (0.1 + 0.9 * 0.5))


def test_split_is_by_document_and_holds_five_percent():
    docs = [demo_data.Document(f"d{i}.rst.txt", "word " * (10 + 7 * i)) for i in range(60)]
    train, test = demo_data.split_documents(docs)
    assert not {d.path for d in train} & {d.path for d in test}
    assert len(train) + len(test) == 60 and len(test) >= 3
    assert sum(d.words for d in test) >= 0.05 * sum(d.words for d in docs)
    assert demo_data.split_documents(list(reversed(docs)))[1] == test      # a function of the paths only


def test_batches_are_a_function_of_seed_and_step():
    docs = [torch.arange(i * 100, i * 100 + 50 + i) for i in range(6)]
    a, b = demo_data.Batches(docs, 2, 8, seed=3), demo_data.Batches(docs, 2, 8, seed=3)
    steps = [a.at(s) for s in range(2 * a.per_epoch)]
    assert all(torch.equal(b.at(s), steps[s]) for s in reversed(range(len(steps))))
    assert steps[0].shape == (2, 9)
    flat = torch.cat(docs).tolist()
    for w in steps[0]:                        # every window is 9 consecutive tokens of one shuffled stream
        assert all(w[i + 1] - w[i] == 1 for i in range(8) if w[i + 1] // 100 == w[i] // 100)
        assert set(w.tolist()) <= set(flat)


TINY = train_demo.TrainConfig(steps=3, batch=2, context=8, warmup=1, hidden=32, d_ff=64, layers=2, heads=2,
                              log_every=1, eval_windows=4)


def _tiny_data(out):
    """out/data as `prepare` writes it, from the sentences above (no python3.11-doc needed)."""
    data = out / "data"
    data.mkdir(parents=True)
    tokenizer = demo_data.train_tokenizer(SENTENCES[:6], vocab_size=300)
    demo_data.save_tokenizer(tokenizer, data / "tokenizer")
    torch.save(demo_data.split_tokens(tokenizer, [demo_data.Document("a", s) for s in SENTENCES[:6] * 4]),
               data / "train.pt")
    torch.save(demo_data.split_tokens(tokenizer, [demo_data.Document("b", s) for s in SENTENCES[6:]]),
               data / "test.pt")
    (data / "manifest.json").write_text(json.dumps({"train": {}, "test": {}}))
    return tokenizer


@pytest.mark.parametrize("variant", ["sparse", "all"])
def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, monkeypatch, variant):
    cfg = dataclasses.replace(TINY, ckpt_minutes=0.0, density=0.4 if variant == "all" else TINY.density)
    _tiny_data(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "data", tmp_path / "stopped" / "data")
    whole = train_demo.Run(tmp_path / "whole", variant, cfg)
    whole.train()
    save = train_demo.Run.save

    def crash_after_step_2(run):
        save(run)
        if run.step == 2:
            raise RuntimeError("stopped")
    monkeypatch.setattr(train_demo.Run, "save", crash_after_step_2)
    with pytest.raises(RuntimeError, match="stopped"):
        train_demo.Run(tmp_path / "stopped", variant, cfg).train()
    monkeypatch.setattr(train_demo.Run, "save", save)
    resumed = train_demo.Run(tmp_path / "stopped", variant, cfg)
    assert resumed.step == 2
    resumed.train()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["step"] for r in resumed.train_curve] == [1, 2, 3]


def test_tiny_training_exports_a_plain_llama_that_the_app_runs_as_trained(tmp_path, monkeypatch):
    tokenizer = _tiny_data(tmp_path)
    cfg = TINY
    res = train_demo.run_variant(tmp_path, "sparse", cfg)
    assert res["steps"] == 3 and res["tokens_seen"] == 3 * 2 * 8
    curves = json.loads((tmp_path / "runs" / "sparse" / "curves.json").read_text())
    assert [r["step"] for r in curves["train"]] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in curves["train"])
    assert math.isclose(res["heldout"]["dense"]["perplexity"], math.exp(res["heldout"]["dense"]["loss"]))

    export = tmp_path / "export" / "demo-lm"
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("The for statement")["input_ids"]
    assert ids[0] == tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == tokenizer.eos_token_id
    model = LlamaForCausalLM.from_pretrained(export).float().eval()
    assert type(model.model.layers[0].mlp) is LlamaMLP
    assert json.loads((export / "config.json").read_text())["dtype"] == "float16"

    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    from sam_viz.models import load_model
    from sam_viz.sparse_ops import Policy, sparsified
    loaded = load_model(str(export))
    enc = loaded.encode("The for statement iterates over a list.")
    with torch.no_grad(), sparsified(loaded, Policy("topk", cfg.density)):
        app = loaded.model(**enc).logits.float()
    for layer in model.model.layers:                     # the same density, masked by hand
        layer.mlp.register_forward_hook(lambda mod, args, out: _by_hand(
            mod, args[0].view(-1, args[0].shape[-1]), round(cfg.density * 64)).view_as(out))
    with torch.no_grad():
        mine = model(input_ids=enc["input_ids"]).logits
    assert (app - mine).abs().max() <= 1e-5


def test_tiny_whole_model_training_exports_a_llama_that_the_apps_scope_all_topk_runs_as_trained(tmp_path, monkeypatch):
    """demo-lm-all's path (issue 23): trained with top-k on every projection's input at 0.4, exported as a
    plain Llama; the app's whole-model topk at 0.4 gives the logits of the training wrapper."""
    from tools import topk_all

    _tiny_data(tmp_path)
    cfg = dataclasses.replace(TINY, density=0.4, steps=4)
    res = train_demo.run_variant(tmp_path, "all", cfg)
    assert res["name"] == "demo-lm-all" and "topk_all_0.4" in res["heldout"]
    export = tmp_path / "export" / "demo-lm-all"
    model = LlamaForCausalLM.from_pretrained(export).float().eval()
    assert type(model.model.layers[0].mlp) is LlamaMLP                  # no wrapper left in the checkpoint
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    from sam_viz.models import load_model
    from sam_viz.sparse_ops import Policy, default_kernel, sparsified
    loaded = load_model(str(export))
    enc = loaded.encode("The for statement iterates over a list.")
    for kernel in ("reference", "cpu") if default_kernel() == "cpu" else ("reference",):
        with torch.no_grad(), sparsified(loaded, Policy("topk", 0.4, scope="all"), kernel=kernel):
            app = loaded.model(**enc).logits.float()
        for w in topk_all.install(model):
            w.density = 0.4
        with torch.no_grad():
            mine = model(input_ids=enc["input_ids"]).logits
        topk_all.uninstall(model)
        assert (app - mine).abs().max() <= 1e-5, kernel
