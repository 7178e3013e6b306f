"""Readable tokens (models/token_text.py): every token of the demo LM's byte-level vocabulary shown
as the text the tokenizer itself decodes it to, whitespace made visible; WordPiece pieces as they
are; and no "Ġ" or "Ċ" left in what an analysis lists."""
import re

import pytest
import torch

from conftest import shared
from sam_viz import RunSpec, analyze

SHOWN_AS = {"·": " ", "¶": "\n", "→": "\t", "←": "\r"}          # visible mark -> the whitespace it stands for
BYTE = re.compile(r"<0x([0-9A-F]{2})>")


def as_text(shown: str) -> str:
    return "".join(SHOWN_AS.get(c, c) for c in shown)


def as_bytes(shown: str) -> bytes:
    """The bytes a shown token stands for: its text in UTF-8, each <0xNN> as the byte NN."""
    out, pos = b"", 0
    for m in BYTE.finditer(shown):
        out += as_text(shown[pos:m.start()]).encode() + bytes([int(m.group(1), 16)])
        pos = m.end()
    return out + as_text(shown[pos:]).encode()


def test_every_demo_token_shows_what_the_tokenizer_decodes():
    m = shared("demo-lm")
    ids = list(range(len(m.tokenizer)))
    shown = m.token_strings(torch.tensor(ids))
    whole = partial = 0
    for i, s in zip(ids, shown):
        decoded = m.tokenizer.decode([i])
        if "\ufffd" in decoded:                                  # part of a UTF-8 character
            partial += 1
            assert "<0x" in s and as_bytes(s).decode("utf-8", errors="replace") == decoded, (i, s, decoded)
        else:
            whole += 1
            assert as_text(s) == decoded and not any(c in s for c in " \n\t\r"), (i, s, decoded)
    assert whole > 3000 and partial > 0


def test_examples_by_hand():
    m = shared("demo-lm")
    text = "The list type\n    x = [1]\té"
    ids = m.encode(text)["input_ids"][0]
    shown = m.token_strings(ids)
    assert shown[0] == "<|endoftext|>"                             # special tokens as they are
    assert shown[1:4] == ["The", "·list", "·type"]
    assert "¶····" in "".join(shown) and "→" in shown
    assert as_bytes("".join(shown[1:])) == text.encode()          # nothing lost, "é" (two bytes) included


@pytest.mark.parametrize("spec", ["minilm", "tiny-llama"])
def test_wordpiece_pieces_stay_as_they_are(spec):
    m = shared(spec)
    ids = m.encode("Tokenization works")["input_ids"][0]
    assert m.token_strings(ids) == m.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert any(t.startswith("##") for t in m.token_strings(ids))


def test_analysis_lists_text_not_byte_level_pieces():
    a = analyze(shared("demo-lm"), RunSpec(prompt="The list type\nappend", model="demo-lm", density=0.1))
    shown = a.tokens + [t["token"] for name in ("dense", "sparse") for t in a.next_tokens[name]]
    assert "·list" in a.tokens and "¶" in "".join(a.tokens)
    assert not any(c in t for t in shown for c in "ĠĊ")


def test_whitespace_marks_are_in_common_fonts():
    """Arial's metric twin (Liberation Sans) has every mark, so no browser needs a fallback font for
    them ("␣" and "↵" are in neither it nor the app's Source Sans: one browser drew another script's letter)."""
    from pathlib import Path

    from fontTools.ttLib import TTFont

    from sam_viz.models.token_text import VISIBLE

    font = next(Path("/usr/share/fonts").rglob("LiberationSans-Regular.ttf"), None)
    if font is None:
        pytest.skip("Liberation Sans is not installed here")
    cmap = TTFont(font).getBestCmap()
    assert all(ord(mark) in cmap for mark in VISIBLE.values()), VISIBLE
    assert len(set(VISIBLE.values())) == len(VISIBLE) and not set(VISIBLE.values()) & set(VISIBLE)
