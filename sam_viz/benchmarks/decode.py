"""End-to-end batch-1 greedy decode, dense vs sparse, on a random Llama-shaped model: TinyLlama's
MLP and attention dimensions (hidden 2048, intermediate 5632, 32 heads, 4 KV heads), 4 layers, a
vocabulary of 8000 so that the LM head does not dominate the step, fp32, seed 0, built from the
config (no download). The sparse runs go through the real SparseMLP wrappers with `sparsified`
and the `cpu` kernel, with the `static` policy (the same neurons for every token: choosing costs
nothing per token, as in a deployed static-pruning or hot-neuron decoder, cf. PowerInfer).

Its static sets come from a calibration built for the bench (`static_calibration`: the oracle
top-k counts of the dense model's activations on 256 random tokens, one forward pass, about 2 s
here). The full calibration needs a tokenizer and text, which this random model has neither of,
and trains a predictor per layer (10 of its 300 Adam steps took 6.4 s at this width on a 2-core
machine, so about 13 minutes for 4 layers); it would change which neurons are read, not how many.

Reported per density: dense and sparse tokens/s (timed decode steps only, KV cache on, dense and
sparse runs interleaved), f_mlp = share of a dense decode step spent in the MLPs (timed inside the
step), the ideal speedup 1 / (f_other + f_mlp * density) and the share of it achieved.

With `--scope all` (`run_all`) the sparse runs are whole-model `topk` (Q-Sparse: every projection q, k,
v, o, gate, up, down reads only the k = round(density * d_in) largest entries of its input; choosing
reads no weight, so no calibration is needed) at whole-model densities 0.25, 0.4, 0.5 and 0.65, through
the real wrappers (SparseLinear, SparseMLP) and the `cpu` sparse-input kernel. The Amdahl ideal is
1 / (f_other + f_proj * model_density): f_proj is the share of a dense decode step spent inside the
projections' own nn.Linear modules, timed with forward pre/post hooks on each of them (not by
subtracting a step with no-op projections: hooks time what the step really runs, and cost a few
microseconds each, counted in the step); model_density is the share of the blocks' matrix weights the
sparse run read per token, counted by the run's InputRecorder on the prompt.

    python -m sam_viz bench decode [--quick] [--json] [--scope all]      (or python -m bench.decode)
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from sam_viz.models import LoadedModel, adapter_for
from sam_viz.models.loading import seeded
from sam_viz.sparse_ops import InputRecorder, Policy, SparseMLP, install, sparsified
from sam_viz.sparse_ops.calibration import Calibration, static_calibration
from sam_viz.sparse_ops.input_calibration import projection_modules

DENSITIES = (0.05, 0.1, 0.25, 0.5)
WHOLE_DENSITIES = (0.25, 0.4, 0.5, 0.65)                  # --scope all


@dataclass(frozen=True)
class DecodeConfig:
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    layers: int = 4
    vocab: int = 8000
    prompt: int = 16             # prompt tokens (prefill, not timed)
    new: int = 64                # greedy steps timed per run
    repeats: int = 5             # runs per setting, dense and sparse interleaved
    seed: int = 0


QUICK = DecodeConfig(new=32, repeats=3)
TEST = DecodeConfig(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vocab=256, prompt=6, new=4,
                    repeats=1)


def build_model(cfg: DecodeConfig) -> LoadedModel:
    """A random LlamaForCausalLM from the config (seed cfg.seed), fp32, eval, with the sparse wrappers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         num_hidden_layers=cfg.layers, vocab_size=cfg.vocab,
                         max_position_embeddings=max(256, cfg.prompt + cfg.new + 1))
    with seeded(cfg.seed):
        model = LlamaForCausalLM(config).float().eval().requires_grad_(False)
    loaded = LoadedModel(spec="bench-llama", model=model, tokenizer=None, adapter=adapter_for("llama"),
                         kind="causal-lm", model_type="llama", n_layers=cfg.layers, d_ff=cfg.intermediate)
    install(loaded)
    return loaded


def prompt_ids(cfg: DecodeConfig, seed: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    return torch.randint(0, cfg.vocab, (1, cfg.prompt), generator=gen)          # [1, T]


def calibration_ids(cfg: DecodeConfig, n: int = 4, length: int = 64) -> torch.Tensor:
    """Random tokens for the bench's static calibration (another stream than the prompt's). [n, length]"""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(0, cfg.vocab, (n, length), generator=gen)


def greedy(model: torch.nn.Module, ids: torch.Tensor, n_new: int) -> tuple[list[int], list[float]]:
    """Prefill `ids` [1, T], then n_new greedy steps with the KV cache: (the n_new + 1 tokens picked,
    seconds of each decode step). Runs sparsely when called inside `sparsified`."""
    tokens, times = [], []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)          # [1, 1]
        tokens.append(int(nxt))
        for _ in range(n_new):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
            tokens.append(int(nxt))
    return tokens, times


def _share(modules: list[torch.nn.Module], loaded: LoadedModel, ids: torch.Tensor, n_new: int) -> float:
    """Median over dense decode steps of (time inside `modules`) / (step time), timed with forward
    pre/post hooks on each module (removed on return); the prefill's spans are dropped."""
    spans, start = [], [0.0]
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(lambda mod, args: start.__setitem__(0, time.perf_counter())))
            handles.append(m.register_forward_hook(lambda mod, args, out: spans.append(time.perf_counter() - start[0])))
        steps = greedy(loaded.model, ids, n_new)[1]
    finally:
        for h in handles:
            h.remove()
    per_step = torch.tensor(spans[len(modules):]).reshape(n_new, len(modules)).sum(1)      # [n_new], prefill dropped
    return float((per_step / torch.tensor(steps)).median())


def mlp_share(loaded: LoadedModel, ids: torch.Tensor, n_new: int) -> float:
    """f_mlp: the share of a dense decode step spent inside the MLP wrappers (SparseMLP)."""
    return _share([m for m in loaded.model.modules() if isinstance(m, SparseMLP)], loaded, ids, n_new)


def linears(loaded: LoadedModel) -> list[torch.nn.Module]:
    """Every declared projection's own module (through the SparseLinear / SparseMLP wrappers), in order."""
    out = []
    for layer in projection_modules(loaded):
        for module in layer.values():
            while not hasattr(module, "in_features") and hasattr(module, "dense"):
                module = module.dense
            out.append(module)
    return out


def projection_share(loaded: LoadedModel, ids: torch.Tensor, n_new: int) -> float:
    """f_proj: the share of a dense decode step spent inside the projections' nn.Linear modules."""
    return _share(linears(loaded), loaded, ids, n_new)


def model_density(loaded: LoadedModel, policy: Policy, ids: torch.Tensor) -> float:
    """The share of the blocks' matrix weights that `policy` (scope all) reads per token on `ids`."""
    inputs = InputRecorder()
    with sparsified(loaded, policy, kernel="reference", inputs=inputs), torch.no_grad():
        loaded.model(input_ids=ids)
    read, total = inputs.weights()
    return read / total


def ideal_speedup(f_mlp: float, density: float) -> float:
    """Amdahl: only the MLP share of the step shrinks, to `density` of itself."""
    return 1.0 / ((1.0 - f_mlp) + f_mlp * density)


def row(density: float, dense_s: list[float], sparse_s: list[float], f_mlp: float, cfg: DecodeConfig) -> dict:
    """One result row from per-step seconds (medians), with the ideal and the share of it achieved."""
    dense_tok_s, sparse_tok_s = 1.0 / statistics.median(dense_s), 1.0 / statistics.median(sparse_s)
    speedup, ideal = sparse_tok_s / dense_tok_s, ideal_speedup(f_mlp, density)
    return {"density": density, "dense_tok_s": dense_tok_s, "sparse_tok_s": sparse_tok_s, "speedup": speedup,
            "ideal_speedup": ideal, "share_of_ideal": speedup / ideal, "f_mlp": f_mlp,
            "policy": "static", "kernel": "cpu", "threads": torch.get_num_threads(), **asdict(cfg)}


@functools.lru_cache(maxsize=1)
def _model(cfg: DecodeConfig) -> LoadedModel:
    """Kept for the next run (the app's button): the cpu kernel caches each MLP's layout by its
    weights' storage, so a rebuilt model would add another copy of the layouts every run."""
    return build_model(cfg)


@functools.lru_cache(maxsize=1)
def _model_and_calibration(cfg: DecodeConfig) -> tuple[LoadedModel, Calibration]:
    loaded = _model(cfg)
    return loaded, static_calibration(loaded, calibration_ids(cfg))


def run(cfg: DecodeConfig = DecodeConfig(), densities=DENSITIES, progress=None) -> list[dict]:
    """Rows per density. Each repeat decodes densely, then at every density, from the same prompt."""
    step = progress or (lambda frac, text: None)
    step(0.0, "building the model")
    loaded, cal = _model_and_calibration(cfg)
    ids = prompt_ids(cfg)
    dense, sparse = [], {d: [] for d in densities}
    greedy(loaded.model, ids, 2)                                            # warm up (and build the kernel)
    for r in range(cfg.repeats):
        step(0.05 + 0.85 * r / cfg.repeats, f"decode repeat {r + 1} of {cfg.repeats}")
        dense += greedy(loaded.model, ids, cfg.new)[1]
        for d in densities:
            with sparsified(loaded, Policy("static", d), kernel="cpu", calibration=cal):
                sparse[d] += greedy(loaded.model, ids, cfg.new)[1]
    step(0.9, "timing the MLP share of a dense step")
    f_mlp = mlp_share(loaded, ids, cfg.new)
    step(1.0, "done")
    return [row(d, dense, sparse[d], f_mlp, cfg) for d in densities]


def row_all(density: float, dense_s: list[float], sparse_s: list[float], f_proj: float, work: float,
            cfg: DecodeConfig) -> dict:
    """One --scope all row: the Amdahl ideal shrinks the projections' share to the weights read."""
    dense_tok_s, sparse_tok_s = 1.0 / statistics.median(dense_s), 1.0 / statistics.median(sparse_s)
    speedup, ideal = sparse_tok_s / dense_tok_s, ideal_speedup(f_proj, work)
    return {"density": density, "model_density": work, "dense_tok_s": dense_tok_s, "sparse_tok_s": sparse_tok_s,
            "speedup": speedup, "ideal_speedup": ideal, "share_of_ideal": speedup / ideal, "f_proj": f_proj,
            "policy": "topk", "scope": "all", "kernel": "cpu", "threads": torch.get_num_threads(), **asdict(cfg)}


def run_all(cfg: DecodeConfig = DecodeConfig(), densities=WHOLE_DENSITIES, progress=None) -> list[dict]:
    """Rows per whole-model density, dense vs whole-model topk through the cpu kernel (interleaved)."""
    step = progress or (lambda frac, text: None)
    step(0.0, "building the model")
    loaded = _model(cfg)
    ids = prompt_ids(cfg)
    policies = {d: Policy("topk", d, scope="all") for d in densities}
    dense, sparse = [], {d: [] for d in densities}
    greedy(loaded.model, ids, 2)                                            # warm up (and build the kernel)
    for d in densities:
        with sparsified(loaded, policies[d], kernel="cpu"):
            greedy(loaded.model, ids, 2)
    for r in range(cfg.repeats):
        step(0.05 + 0.85 * r / cfg.repeats, f"decode repeat {r + 1} of {cfg.repeats}")
        dense += greedy(loaded.model, ids, cfg.new)[1]
        for d in densities:
            with sparsified(loaded, policies[d], kernel="cpu"):
                sparse[d] += greedy(loaded.model, ids, cfg.new)[1]
    step(0.9, "timing the projections' share of a dense step")
    f_proj = projection_share(loaded, ids, cfg.new)
    step(1.0, "done")
    return [row_all(d, dense, sparse[d], f_proj, model_density(loaded, policies[d], ids), cfg) for d in densities]


def report_all(rows: list[dict], cfg: DecodeConfig) -> list[str]:
    """The --scope all rows as `bench decode --scope all` prints them."""
    lines = [f"random Llama: hidden {cfg.hidden}, intermediate {cfg.intermediate}, {cfg.heads} heads / "
             f"{cfg.kv_heads} KV heads, {cfg.layers} layers, vocab {cfg.vocab}, fp32; batch 1, prompt {cfg.prompt}, "
             f"{cfg.new} greedy steps x {cfg.repeats} repeats (medians per step); threads {torch.get_num_threads()}",
             "policy topk on every projection's input (scope all), kernel cpu; "
             f"f_proj = {rows[0]['f_proj']:.3f} of a dense step (hooks on the projections' nn.Linear); "
             "ideal = 1 / (f_other + f_proj * model_density)",
             "density  model_density  dense_tok_s  sparse_tok_s  speedup  ideal  share_of_ideal"]
    for r in rows:
        lines.append(f"{r['density']:7.2f}  {r['model_density']:13.4f}  {r['dense_tok_s']:11.2f}  "
                     f"{r['sparse_tok_s']:12.2f}  {r['speedup']:7.2f}  {r['ideal_speedup']:5.2f}  "
                     f"{r['share_of_ideal']:14.1%}")
    return lines


def report(rows: list[dict], cfg: DecodeConfig) -> list[str]:
    """The rows as the table `bench decode` prints, after the setting and the f_mlp it measured."""
    lines = [f"random Llama: hidden {cfg.hidden}, intermediate {cfg.intermediate}, {cfg.heads} heads / "
             f"{cfg.kv_heads} KV heads, {cfg.layers} layers, vocab {cfg.vocab}, fp32; batch 1, prompt {cfg.prompt}, "
             f"{cfg.new} greedy steps x {cfg.repeats} repeats (medians per step); threads {torch.get_num_threads()}",
             "policy static (static sets from a bench-built calibration on random tokens), kernel cpu; "
             f"f_mlp = {rows[0]['f_mlp']:.3f} of a dense step; ideal = 1 / (f_other + f_mlp * density), relative "
             "to torch's dense MLP (a kernel that reads rows faster than torch's dense GEMV can pass 100%)",
             "density  dense_tok_s  sparse_tok_s  speedup  ideal  share_of_ideal"]
    for r in rows:
        lines.append(f"{r['density']:7.2f}  {r['dense_tok_s']:11.2f}  {r['sparse_tok_s']:12.2f}  {r['speedup']:7.2f}  "
                     f"{r['ideal_speedup']:5.2f}  {r['share_of_ideal']:14.1%}")
    return lines
