"""Text that users and models wrote, shown as text. Streamlit reads every caption, label and message
as GitHub-flavoured markdown with extras (LaTeX between `$` signs, `:color[...]` directives, emoji
shortcodes), so a prompt such as "costs $20 and $15" can turn into a formula. Escaping follows
CommonMark: any ASCII punctuation may be backslash-escaped, and a numeric character reference
(`&#36;`) is always literal text, in markdown and in HTML alike.

Also here: the HTML rows of coloured tokens (Attribution page) and of a continuation (Dense vs sparse
page), and the incremental detokenization that turns generated ids into the text each one adds (as
streaming servers such as vLLM's detokenizer do), so "##geny" or "Ġthe" read as "geny" and " the".
"""
from __future__ import annotations

import html
import re
from typing import Callable, Sequence

_MD_ANYWHERE = re.compile(r"[\\`*_~\[\]<>&$|]")           # inline markdown, HTML, math, tables
_MD_LINE_MARK = re.compile(r"^([ \t]*)([#+=-])", re.M)      # headings, lists, setext underlines
_MD_LINE_NUMBER = re.compile(r"^([ \t]*)(\d+)([.)])", re.M)  # ordered lists
_HTML = {ord(c): html.escape(c) for c in "&<>'\""} | {ord(c): f"&#{ord(c)};" for c in "\\`*_~[]$:|\n"}
CONTEXT_TOKENS = 4        # prompt tokens decoded before a continuation, so its first piece reads right


def escape_markdown(text) -> str:
    """`text` for a markdown context (st.markdown, captions, messages, labels): shown literally."""
    s = _MD_ANYWHERE.sub(lambda m: "\\" + m.group(), str(text))
    s = _MD_LINE_MARK.sub(r"\1\\\2", s)
    s = _MD_LINE_NUMBER.sub(r"\1\2\\\3", s)
    return s.replace(":", "&#58;")        # directives, emoji and ":material/" are matched on the source


def escape_html(text) -> str:
    """`text` for HTML we build, literal in a browser and in Streamlit's markdown with HTML on:
    html.escape, and every markdown sign as a character reference (a newline too, so the text
    stays within its markdown line)."""
    return str(text).translate(_HTML)


def colored_tokens(tokens: Sequence[str], values: Sequence[float], scale: float | None = None) -> str:
    """One row of tokens as HTML spans, red for positive values and blue for negative ones, the
    colour's strength proportional to |value| / scale (full at scale and above; scale: the row's own
    max |value| when None, give one to put several rows on one scale); the value itself as a tooltip."""
    top = (scale if scale is not None else max((abs(v) for v in values), default=1.0)) or 1.0
    spans = []
    for t, v in zip(tokens, values):
        alpha = min(1.0, abs(v) / top)
        rgb = "214,39,40" if v > 0 else "31,119,180"
        spans.append(f'<span title="{v:+.4f}" style="background: rgba({rgb},{alpha:.2f}); padding: 2px 3px; '
                     f'margin: 1px; border-radius: 3px; display: inline-block">{escape_html(t)}</span>')
    return " ".join(spans)


def continuation_html(pieces: Sequence[str], mark: int | None = None) -> str:
    """Generated text as HTML, piece by piece, the piece at index `mark` highlighted; line breaks kept."""
    out = [escape_html(p) for p in pieces]
    if mark is not None and 0 <= mark < len(out):
        out[mark] = f"<mark>{out[mark]}</mark>"
    return "".join(out).replace("&#10;", "<br>")


def decoded_pieces(decode: Callable[[list[int]], str], context: Sequence[int], ids: Sequence[int]) -> list[str]:
    """[len(ids)]: the text each id adds when `context + ids` is decoded one id more at a time; joined,
    the pieces are the decoded text after the context. When an id rewrites the end of the text (the
    second byte of "é" replaces the replacement character, a tokenizer's clean-up of "do n't"), the
    rewritten characters move from the earlier pieces to this one."""
    context = list(context)[-CONTEXT_TOKENS:]
    start, pieces, shown = len(decode(context)), [], ""          # shown == "".join(pieces)
    for i in range(1, len(ids) + 1):
        text = decode(context + list(ids[:i]))[start:]
        keep = next((k for k, (a, b) in enumerate(zip(shown, text)) if a != b), min(len(shown), len(text)))
        _drop_tail(pieces, len(shown) - keep)
        pieces.append(text[keep:])
        shown = text
    return pieces


def _drop_tail(pieces: list[str], n: int) -> None:
    """Remove the last n characters of "".join(pieces), keeping one entry per piece."""
    for j in range(len(pieces) - 1, -1, -1):
        if n <= 0:
            return
        cut = min(n, len(pieces[j]))
        pieces[j], n = pieces[j][:len(pieces[j]) - cut], n - cut
