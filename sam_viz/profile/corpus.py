"""Corpus sources for a profile, and their cut into fixed-length token contexts, in shards.

A source is a `.txt` file (documents split on blank lines), a `.jsonl`, `.csv` or `.parquet` file
with a text column, or `builtin:calibration` (sparse_ops' shipped calibration text). The documents'
tokens (no special tokens) are concatenated in document order and cut into non-overlapping windows
of `context` tokens (a window may span two documents, as in GPT-2's training; the last incomplete
window is dropped). Each token keeps its document id and its position inside that document, so an
example can be shown in its own document whatever window it was seen in. The corpus hash is the
sha256 of the documents (length-prefixed, so the split into documents counts).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sam_viz.models import InputError

from ..files import decode_text, read_bytes

BUILTIN = "builtin:calibration"
FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
MAX_BYTES = 1 << 30                       # a corpus file is read into memory: 1 GiB at most
SHARD_TOKENS = 4096                       # tokens per shard (whole windows)


@dataclass(frozen=True)
class Corpus:
    source: str
    documents: tuple[str, ...]
    text_column: str | None

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for doc in self.documents:
            data = doc.encode("utf-8")
            h.update(len(data).to_bytes(8, "little") + data)
        return h.hexdigest()


@dataclass(frozen=True)
class Shard:
    """Windows [W, T] of token ids with each token's document and position in it (engine payload)."""
    index: int
    ids: np.ndarray                       # [W, T] int64
    doc: np.ndarray                       # [W, T] int64
    pos: np.ndarray                       # [W, T] int64

    @property
    def tokens(self) -> int:
        return int(self.ids.size)


@dataclass(frozen=True)
class TokenStream:
    """All profiled tokens in corpus order, and where each document starts in it."""
    ids: np.ndarray                       # [N] int64
    doc: np.ndarray                       # [N] int64
    pos: np.ndarray                       # [N] int64
    context: int
    limit: int                            # tokens in whole windows (<= max_tokens)

    @property
    def windows(self) -> int:
        return self.limit // self.context

    @property
    def shard_tokens(self) -> int:
        """Tokens per shard (the last one may hold fewer)."""
        return max(1, SHARD_TOKENS // self.context) * self.context

    def shards(self, start: int = 0):
        """Shards of SHARD_TOKENS (whole windows), from shard index `start` on."""
        per = max(1, SHARD_TOKENS // self.context)
        for i in range(start, -(-self.windows // per)):
            a, b = i * per * self.context, min(self.windows, (i + 1) * per) * self.context
            shape = (-1, self.context)
            yield Shard(i, self.ids[a:b].reshape(shape), self.doc[a:b].reshape(shape), self.pos[a:b].reshape(shape))

    def n_shards(self) -> int:
        per = max(1, SHARD_TOKENS // self.context)
        return -(-self.windows // per)

    def context_of(self, doc: int, pos: int, radius: int) -> tuple[np.ndarray, int]:
        """Token ids of doc within `radius` of pos (clipped to the document and the stream), focus index."""
        first = int(np.searchsorted(self.doc, doc))               # doc ids ascend along the stream
        last = int(np.searchsorted(self.doc, doc, side="right"))
        a, b = max(first, first + pos - radius), min(last, first + pos + radius + 1)
        return self.ids[a:b], first + pos - a


def read_corpus(source: str, text_column: str | None = None) -> Corpus:
    """The documents of `source`; one clear sentence (InputError) for anything unusable."""
    if not isinstance(source, str) or not source.strip():
        raise InputError("corpus is empty; name a file (.txt, .jsonl, .csv, .parquet) or builtin:calibration")
    if source == BUILTIN:
        from sam_viz.sparse_ops import calibration_texts

        texts = calibration_texts()
        return Corpus(source, tuple(t for t in (*texts["train"], *texts["held_out"]) if t.strip()), None)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"corpus '{source[:80]}' has an unknown format; use a .txt, .jsonl, .csv or .parquet "
                         f"file, or {BUILTIN}")
    data = read_bytes(path, "corpus file", source[:80], MAX_BYTES)
    column = None if suffix == ".txt" else (text_column or "text")
    if suffix == ".parquet":
        docs = _parquet(data, source, column)
    else:
        text = decode_text(data, "corpus file", source[:80])
        docs = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv}[suffix](text, source, column)
    docs = tuple(d for d in docs if d.strip())
    if not docs:
        raise InputError(f"corpus '{source[:80]}' holds no text")
    return Corpus(source, docs, column)


def tokenize(loaded, corpus: Corpus, context: int, max_tokens: int | None = None) -> TokenStream:
    """The corpus' tokens cut into whole windows of `context`, at most max_tokens in all."""
    if context > loaded.max_tokens:
        raise InputError(f"context {context} is over {loaded.spec}'s limit of {loaded.max_tokens} tokens")
    need = None if max_tokens is None else (max_tokens // context) * context
    ids, docs, pos, n = [], [], [], 0
    for d, text in enumerate(corpus.documents):
        tok = np.asarray(loaded.plain_ids(text), dtype=np.int64)
        ids.append(tok)
        docs.append(np.full(tok.size, d, dtype=np.int64))
        pos.append(np.arange(tok.size, dtype=np.int64))
        n += tok.size
        if need is not None and n >= need + context:          # a little past the cap, for examples' context
            break
    n_windows = n // context if need is None else min(n, need) // context
    if n_windows == 0:
        raise InputError(f"the corpus is {n} tokens for {loaded.spec}, shorter than one context of {context} "
                         "tokens")
    return TokenStream(np.concatenate(ids), np.concatenate(docs), np.concatenate(pos), context,
                       n_windows * context)


def _txt(text: str, source: str, column) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    return docs + (["\n".join(current)] if current else [])


def _missing(source: str, column: str, columns) -> InputError:
    have = ", ".join(str(c)[:40] for c in list(columns)[:20]) or "none"
    return InputError(f"corpus '{source[:80]}' has no column '{column[:40]}'; its columns: {have}")


def _jsonl(text: str, source: str, column: str) -> list[str]:
    docs, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"corpus '{source[:80]}' line {n} is not JSON") from None
        if not isinstance(row, dict):
            raise InputError(f"corpus '{source[:80]}' line {n} is not a JSON object")
        seen.update(dict.fromkeys(row))
        if column in row:
            docs.append(_text(row[column], source, column))
    if not docs and seen:
        raise _missing(source, column, seen)
    return docs


def _csv(text: str, source: str, column: str) -> list[str]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        fields = reader.fieldnames or []
        if column not in fields:
            raise _missing(source, column, fields)
        return [row[column] or "" for row in reader]
    except csv.Error as exc:
        raise InputError(f"corpus '{source[:80]}' is not valid CSV ({exc})") from None


def _parquet(data: bytes, source: str, column: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(pa.BufferReader(data))
        if column not in schema.names:
            raise _missing(source, column, schema.names)
        values = pq.read_table(pa.BufferReader(data), columns=[column]).column(column).to_pylist()
    except (pa.ArrowInvalid, OSError):
        raise InputError(f"corpus '{source[:80]}' is not a Parquet file") from None
    return [_text(v, source, column) for v in values]


def _text(value, source: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"corpus '{source[:80]}' column '{column[:40]}' holds {type(value).__name__} values, "
                         "not text")
    return value
