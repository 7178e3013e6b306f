"""Corpus, split, tokenizer and token batches for the demo language models (tools/train_demo.py).

The text is the reStructuredText source of the Python 3.11 documentation as Debian's python3.11-doc
installs it (PSF licence). One file is one document. The split is by document and stable: documents
taken in sha256(relative path) order go to `test` until it holds at least 5% of the documents and
5% of the words; the rest is `train`. The tokenizer (byte-level BPE, as GPT-2's) is trained on the
train split only. Training contexts are windows of the train documents concatenated in a shuffled
order, each document preceded by the one special token `<|endoftext|>` (bos = eos = pad = unk), so
that a prompt encoded with that token in front (as the app does) looks like the start of a document.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
SPECIAL = "<|endoftext|>"
TEST_SHARE = 0.05


@dataclass(frozen=True)
class Document:
    path: str                     # relative to the corpus root
    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())


def read_corpus(root: Path = DOC_ROOT) -> list[Document]:
    """Every *.rst.txt under root, in path order; a missing root is one clear sentence."""
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"error: no *.rst.txt under {root}; install Debian's python3.11-doc")
    return [Document(str(f.relative_to(root)), f.read_text(encoding="utf-8")) for f in files]


def split_documents(docs: list[Document], share: float = TEST_SHARE) -> tuple[list[Document], list[Document]]:
    """(train, test): test = the first documents in sha256(path) order until it holds at least
    `share` of the documents and of the words. Both lists come back in path order."""
    total_words = sum(d.words for d in docs)
    test, words = [], 0
    for doc in sorted(docs, key=lambda d: hashlib.sha256(d.path.encode()).hexdigest()):
        if len(test) >= share * len(docs) and words >= share * total_words:
            break
        test.append(doc)
        words += doc.words
    held = {d.path for d in test}
    return [d for d in docs if d.path not in held], sorted(test, key=lambda d: d.path)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE PreTrainedTokenizerFast whose encoding starts with the special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A {SPECIAL} $B", special_tokens=[(SPECIAL, tok.token_to_id(SPECIAL))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   pad_token=SPECIAL, unk_token=SPECIAL, model_max_length=512)


def save_tokenizer(tokenizer, target: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json. The config names the class
    PreTrainedTokenizerFast (transformers 5 writes its own alias, TokenizersBackend, which 4.x lacks)."""
    tokenizer.save_pretrained(target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for loading_state in ("is_local", "local_files_only"):
        config.pop(loading_state, None)
    config_path.write_text(json.dumps(config, indent=2))
    special = {k: SPECIAL for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (target / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def windows(tokens: torch.Tensor, context: int) -> torch.Tensor:
    """[N] -> [W, context + 1]: consecutive windows that overlap by one token (input + next token)."""
    n = (tokens.numel() - 1) // context
    starts = torch.arange(n) * context
    return tokens[starts[:, None] + torch.arange(context + 1)]


class Batches:
    """Training batches, a pure function of (seed, step): epoch e shuffles the documents and the
    windows with generator seed + e, so a run resumes from its step alone and two runs with the same
    seed see the same tokens in the same order."""

    def __init__(self, doc_tokens: list[torch.Tensor], batch: int, context: int, seed: int):
        self.docs, self.batch, self.context, self.seed = doc_tokens, batch, context, seed
        self._epoch, self._windows = -1, None
        self.per_epoch = windows(torch.cat(doc_tokens), context).shape[0] // batch

    def _epoch_windows(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.docs), generator=g).tolist()
            w = windows(torch.cat([self.docs[i] for i in order]), self.context)
            self._epoch, self._windows = epoch, w[torch.randperm(w.shape[0], generator=g)]
        return self._windows

    def at(self, step: int) -> torch.Tensor:
        """[batch, context + 1] for training step `step` (0-based)."""
        epoch, i = divmod(step, self.per_epoch)
        return self._epoch_windows(epoch)[i * self.batch:(i + 1) * self.batch]


def split_tokens(tokenizer, docs: list[Document]) -> list[torch.Tensor]:
    """One tensor per document: the special token, then the document's tokens."""
    ids = tokenizer([d.text for d in docs], add_special_tokens=True)["input_ids"]
    return [torch.tensor(i, dtype=torch.long) for i in ids]


def prepare(out: Path, vocab_size: int, root: Path = DOC_ROOT, tokenizer_dir: Path | None = None) -> dict:
    """Split the corpus, train the tokenizer on train (or load the one in `tokenizer_dir`, e.g. a
    shipped model's, so a new model shares it), save tokens and tokenizer under out/data, and write
    out/data/manifest.json (files, documents, words, bytes and tokens per split)."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, test = split_documents(read_corpus(root))
    if tokenizer_dir is None:
        tokenizer = train_tokenizer([d.text for d in train], vocab_size)
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    save_tokenizer(tokenizer, data / "tokenizer")
    manifest = {"source": str(root), "licence": "PSF (Python documentation)",
                "split_rule": f"test = first documents in sha256(relative path) order until >= {TEST_SHARE:.0%} "
                              "of documents and of words", "dropped": [], "vocab_size": len(tokenizer),
                "tokenizer": "trained on train" if tokenizer_dir is None else f"loaded from {tokenizer_dir}"}
    for name, docs in (("train", train), ("test", test)):
        toks = split_tokens(tokenizer, docs)
        torch.save(toks, data / f"{name}.pt")
        (data / f"{name}.txt").write_text(SPECIAL.join(d.text for d in docs), encoding="utf-8")
        manifest[name] = {"documents": len(docs), "words": sum(d.words for d in docs),
                          "bytes": sum(len(d.text.encode()) for d in docs),
                          "tokens": sum(t.numel() for t in toks), "files": [d.path for d in docs]}
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("prepared: train %d docs %d words %d tokens; test %d docs %d words %d tokens",
             *(manifest[s][k] for s in ("train", "test") for k in ("documents", "words", "tokens")))
    return manifest
