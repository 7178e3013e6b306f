"""Train and export the two demo causal LMs of DESIGN.md: `demo-lm` (top-k MLP sparsity in the
loop) and `demo-lm-dense` (its dense twin), small Llama models on the Python 3.11 documentation.

    python -m tools.train_demo prepare --out DIR                # split, tokenizer, token counts
    python -m tools.train_demo --out DIR [--variant dense|sparse|both] [--steps N] [...]

Both models have the same architecture (LlamaForCausalLM, SwiGLU MLP), the same initial weights,
the same tokens in the same order, the same optimiser and schedule. Why SwiGLU for both and top-k
rather than ReLU plus an activation penalty (ProSparse): the sparse model keeps the dense twin's
architecture and the one the app's Llama adapter expects; the sparsity used in training is exactly
the app's `topk` policy at density 0.1 (per token, the 102 of 1024 neurons with the largest abs(h),
h = silu(W_gate x) * (W_up x); see tools/topk_mlp.py), so inference computes what training
computed; and the density is exactly 0.1 for every token, not a rate that varies with the text.
`demo-lm` trains dense for the first 5% of the steps, then its density is annealed from 1.0 to 0.1
(linearly in log space) by 30% of the steps, and stays at 0.1 to the end.

A run checkpoints (model, optimiser, step, curves) every --ckpt-minutes and resumes from its
checkpoint when started again; the data order is a function of (seed, step). At the end it exports
a standard Hugging Face folder (fp16 safetensors, tokenizer) under DIR/export/<name> and writes
DIR/runs/<variant>/results.json; once both variants are done, DIR/results.json holds both.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tools import demo_data, topk_all, topk_mlp

log = logging.getLogger("train_demo")

NAMES = {"dense": "demo-lm-dense", "sparse": "demo-lm", "all": "demo-lm-all"}
WRAP = {"sparse": topk_mlp, "all": topk_all}   # how each trained-sparse variant wraps the model
PROMPTS = ("The list type", "To open a file", "The for statement", "A dictionary maps",
           "When an exception is raised")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch: int = 16
    context: int = 128
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    density: float = 0.1          # demo-lm's trained MLP density
    ckpt_minutes: float = 10.0
    log_every: int = 10
    eval_windows: int = 64        # held-out windows evaluated at each checkpoint
    hidden: int = 256
    d_ff: int = 1024
    layers: int = 4
    heads: int = 4


def llama_config(cfg: TrainConfig, vocab: int, special_id: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.d_ff,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads, max_position_embeddings=512,
                       tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                       bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import LlamaForCausalLM
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(llama_config(cfg, len(tokenizer), tokenizer.eos_token_id)).float()


def optimiser(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (and the tied embedding), not on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))


def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of [B, T + 1] windows (inputs [:, :-1], targets [:, 1:])."""
    logits = model(input_ids=windows[:, :-1]).logits                     # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token loss over all windows (every window has the same number of targets)."""
    model.eval()
    losses = [lm_loss(model, windows[i:i + batch]).item() * len(windows[i:i + batch])
              for i in range(0, len(windows), batch)]
    model.train()
    return sum(losses) / len(windows)


class Run:
    """One variant's training state: model, optimiser, data, curves; saved and resumed as a whole."""

    def __init__(self, out: Path, variant: str, cfg: TrainConfig):
        self.out, self.variant, self.cfg = out, variant, cfg
        self.dir = out / "runs" / variant
        self.dir.mkdir(parents=True, exist_ok=True)
        data = out / "data"
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
        self.batches = demo_data.Batches(torch.load(data / "train.pt"), cfg.batch, cfg.context, cfg.seed)
        test = demo_data.windows(torch.cat(torch.load(data / "test.pt")), cfg.context)
        self.test_all = test
        self.test_fixed = test[torch.linspace(0, len(test) - 1, min(cfg.eval_windows, len(test))).long()]
        self.model = build_model(cfg, self.tokenizer)
        self.wrappers = WRAP[variant].install(self.model) if variant in WRAP else []
        self.opt = optimiser(self.model, cfg)
        self.step, self.elapsed, self.train_curve, self.eval_curve = 0, 0.0, [], []
        self._resume()

    @property
    def ckpt(self) -> Path:
        return self.dir / "checkpoint.pt"

    def _resume(self) -> None:
        if not self.ckpt.exists():
            return
        state = torch.load(self.ckpt, weights_only=False)
        if state["config"] != asdict(self.cfg):
            raise SystemExit(f"error: {self.ckpt} was written with other settings; use another --out or delete it")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.train_curve, self.eval_curve = state["train_curve"], state["eval_curve"]
        log.info("%s: resumed at step %d (%.0f s trained)", self.variant, self.step, self.elapsed)

    def save(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                 "elapsed": self.elapsed, "train_curve": self.train_curve, "eval_curve": self.eval_curve,
                 "config": asdict(self.cfg), "data_position": divmod(self.step, self.batches.per_epoch)}
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)
        self.write_curves()

    def write_curves(self) -> None:
        curves = {"variant": self.variant, "tokens_per_step": self.cfg.batch * self.cfg.context,
                  "train": self.train_curve, "heldout": self.eval_curve}
        (self.dir / "curves.json").write_text(json.dumps(curves))

    def density(self, step: int) -> float:
        return topk_mlp.sparsity_schedule(step, self.cfg.steps, self.cfg.density) if self.wrappers else 1.0

    def evaluate(self, windows: torch.Tensor) -> dict:
        """Held-out loss at the current training density, and (sparse) with every neuron."""
        result = {"loss": heldout_loss(self.model, windows)}
        if self.wrappers:
            at = self.wrappers[0].density
            topk_mlp.set_density(self.wrappers, 1.0)
            result["loss_dense"] = heldout_loss(self.model, windows)
            topk_mlp.set_density(self.wrappers, at)
        return result

    def log_eval(self) -> None:
        row = {"step": self.step, "tokens": self.step * self.cfg.batch * self.cfg.context,
               "elapsed_s": round(self.elapsed, 1), "density": self.density(self.step),
               **self.evaluate(self.test_fixed)}
        self.eval_curve.append(row)
        log.info("%s: held-out %s", self.variant, json.dumps(row))

    def train(self) -> None:
        cfg, losses, mark, t_log = self.cfg, [], time.monotonic(), time.monotonic()
        if self.step == 0 and not self.eval_curve:
            self.log_eval()
        self.model.train()
        while self.step < cfg.steps:
            topk_mlp.set_density(self.wrappers, self.density(self.step))
            lr = topk_mlp.lr_schedule(self.step, cfg.steps, cfg.lr, cfg.warmup)
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss = lm_loss(self.model, self.batches.at(self.step))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
            self.opt.step()
            losses.append(loss.item())
            self.step += 1
            now = time.monotonic()
            self.elapsed, mark = self.elapsed + (now - mark), now
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                tok_s = len(losses) * cfg.batch * cfg.context / max(now - t_log, 1e-9)
                self.train_curve.append({"step": self.step, "loss": sum(losses) / len(losses), "lr": lr,
                                         "density": self.wrappers[0].density if self.wrappers else 1.0,
                                         "elapsed_s": round(self.elapsed, 1), "tokens_per_s": round(tok_s)})
                log.info("%s: %s", self.variant, json.dumps(self.train_curve[-1]))
                losses, t_log = [], time.monotonic()
            if self._due() or self.step == cfg.steps:
                self.log_eval()
                self.save()
                mark = time.monotonic()

    def _due(self) -> bool:
        last = self.eval_curve[-1]["elapsed_s"] if self.eval_curve else 0.0
        return self.elapsed - last >= 60 * self.cfg.ckpt_minutes

    def export(self) -> Path:
        """A plain Llama checkpoint in fp16 (wrappers removed), with the tokenizer."""
        from transformers import GenerationConfig
        target = self.out / "export" / NAMES[self.variant]
        model = copy.deepcopy(self.model)
        if self.variant in WRAP:
            WRAP[self.variant].uninstall(model)
        model.generation_config = GenerationConfig(bos_token_id=self.tokenizer.bos_token_id,
                                                   eos_token_id=self.tokenizer.eos_token_id,
                                                   pad_token_id=self.tokenizer.pad_token_id, do_sample=False)
        model.half().save_pretrained(target, safe_serialization=True)
        demo_data.save_tokenizer(self.tokenizer, target)
        return target


@torch.no_grad()
def continuation(model, tokenizer, prompt: str, tokens: int = 40) -> str:
    """Greedy continuation (argmax at each step, stops at the special token)."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    for _ in range(tokens):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        if nxt.item() == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, start:])


def results(run: Run) -> dict:
    """Held-out loss / perplexity on the whole test split, and greedy continuations."""
    cfg, wrappers = run.cfg, run.wrappers or topk_mlp.install(run.model)   # the twin: post-hoc top-k too
    out = {"name": NAMES[run.variant], "variant": run.variant, "steps": run.step,
           "tokens_seen": run.step * cfg.batch * cfg.context, "wall_time_s": round(run.elapsed, 1),
           "final_train_loss": sum(r["loss"] for r in run.train_curve[-5:]) / len(run.train_curve[-5:]),
           "heldout_windows": len(run.test_all), "heldout_tokens": len(run.test_all) * cfg.context,
           "config": asdict(cfg), "heldout": {}, "continuations": {}}
    label = f"topk_all_{cfg.density}" if run.variant == "all" else f"topk_{cfg.density}"
    for label, density in (("dense", 1.0), (label, cfg.density)):
        topk_mlp.set_density(wrappers, density)
        loss = heldout_loss(run.model, run.test_all)
        out["heldout"][label] = {"loss": loss, "perplexity": math.exp(loss)}
        out["continuations"][label] = {p: continuation(run.model, run.tokenizer, p) for p in PROMPTS}
    topk_mlp.set_density(wrappers, cfg.density if run.wrappers else 1.0)
    if not run.wrappers:
        topk_mlp.uninstall(run.model)
    return out


def run_variant(out: Path, variant: str, cfg: TrainConfig) -> dict:
    run = Run(out, variant, cfg)
    run.train()
    path = run.export()
    res = {**results(run), "export": str(path)}
    (run.dir / "results.json").write_text(json.dumps(res, indent=1))
    log.info("%s: exported to %s; held-out %s", variant, path, json.dumps(res["heldout"]))
    return res


def combine(out: Path) -> None:
    """DIR/results.json with both variants and the data manifest, once both have finished."""
    parts = {v: out / "runs" / v / "results.json" for v in ("dense", "sparse")}
    if all(p.exists() for p in parts.values()):
        manifest = json.loads((out / "data" / "manifest.json").read_text())
        for split in ("train", "test"):
            manifest[split] = {k: v for k, v in manifest[split].items() if k != "files"}
        combined = {"data": manifest, **{NAMES[v]: json.loads(p.read_text()) for v, p in parts.items()}}
        (out / "results.json").write_text(json.dumps(combined, indent=1))


def parse_args(argv=None) -> tuple[argparse.Namespace, TrainConfig]:
    ap = argparse.ArgumentParser(prog="python -m tools.train_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", nargs="?", choices=("prepare", "train"), default="train")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", choices=("dense", "sparse", "all", "both"), default="both",
                    help="all: top-k on the input of every projection (demo-lm-all; pass --density 0.4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--corpus", type=Path, default=demo_data.DOC_ROOT)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="prepare with this tokenizer folder (e.g. models/demo/demo-lm) instead of training one")
    for name, default in asdict(TrainConfig()).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = ap.parse_args(argv)
    return args, TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args, cfg = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage == "prepare" or not (args.out / "data" / "manifest.json").exists():
        demo_data.prepare(args.out, args.vocab, args.corpus, args.tokenizer)
    if args.stage == "train":
        for variant in (("dense", "sparse") if args.variant == "both" else (args.variant,)):
            run_variant(args.out, variant, cfg)
        combine(args.out)


if __name__ == "__main__":
    main()
