"""Tokens as readable text. Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2, the demo LMs) store
each token's bytes as printable stand-ins (bytes_to_unicode in OpenAI's GPT-2 encoder.py): a space
is "Ġ", a newline "Ċ", so "Ġlist" is " list". Here a token becomes the text it adds, with its
whitespace made visible (a token often is a space, or starts with one): "·list", "¶···", as a word
processor shows formatting marks. The marks are Latin-1 or WGL4 characters, present in the app's
own font (Source Sans) and in Arial / Liberation Sans; "␣" and "↵" are in neither, so a browser drew
them with whatever fallback font it found (in one, another script's letter). A byte
that is only part of a UTF-8 character (the first half of "é") shows as "<0xC3>", as SentencePiece
writes byte tokens. Special tokens ("<|endoftext|>") stay as they are; WordPiece pieces ("##s")
too, since the "##" says the piece continues a word.
"""
from __future__ import annotations

import codecs

VISIBLE = {" ": "·", "\n": "¶", "\t": "→", "\r": "←"}
LEGACY = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}        # the marks before: corpus profiles saved then hold them
_VISIBLE = str.maketrans(VISIBLE)
_HEX_BYTES = "sam_viz.hex_bytes"
codecs.register_error(_HEX_BYTES, lambda e: ("".join(f"<0x{b:02X}>" for b in e.object[e.start:e.end]), e.end))


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in -> byte. Printable Latin-1 bytes stand
    for themselves; the other 68 bytes take the code points 256, 257, ... in byte order."""
    own = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in own]
    return {**{chr(b): b for b in own}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF = _byte_alphabet()


def is_byte_level(tokenizer) -> bool:
    """True for a fast tokenizer whose decoder is (or contains) the byte-level one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    return type(decoder).__name__ == "ByteLevel" or '"ByteLevel"' in str(decoder.__getstate__())


def byte_level_text(piece: str) -> str:
    """The text of one byte-level token, whitespace visible: "Ġlist" -> "·list", "Ċ" -> "¶"."""
    if any(c not in BYTE_OF for c in piece):
        return piece                                       # not from the byte alphabet: as it is
    text = bytes(BYTE_OF[c] for c in piece).decode("utf-8", errors=_HEX_BYTES)
    return text.translate(_VISIBLE)


def readable_tokens(tokenizer, ids: list[int], byte_level: bool) -> list[str]:
    """One display string per id: byte-level tokens as text (byte_level_text), special tokens and
    other vocabularies' pieces as the tokenizer names them."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if not byte_level:
        return pieces
    special = set(tokenizer.added_tokens_decoder)
    return [p if i in special else byte_level_text(p) for i, p in zip(ids, pieces)]
