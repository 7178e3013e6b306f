"""Text shown as text: the escaping helpers against a CommonMark parser (markdown-it-py, which
Streamlit's own dependency rich ships) and against the rules Streamlit's front end applies before
it (LaTeX, directives, emoji), copied from its bundle; continuation pieces against the text itself."""
import re
from html.parser import HTMLParser

import pytest
import torch
from markdown_it import MarkdownIt

from conftest import shared
from sam_viz import RunSpec, greedy_continuation
from sam_viz.text import colored_tokens, continuation_html, decoded_pieces, escape_html, escape_markdown

PROMPT = "The shirt costs $20 and the hat costs $15 at the market. *bold* _it_ `code` <b>x</b> [a](http://x)"
CASES = ["$20 and $15", "costs $x$ here", "$$a$$", "*bold* and **strong**", "_it_ and __it__", "`code` and ``x``",
         "<b>x</b> <script>alert(1)</script>", "[x](y) and ![i](http://x/i.png)", "back\\slash \\* \\$x\\$",
         "~~gone~~", "a | b | c", ":red[r] :smile: :material/home:", "&amp; &#36; &lt;", PROMPT]
LINES = "# title\n- item\n+ item\n1. one\n2) two\n> quote\n===\n---"

# Streamlit 1.67's StreamlitMarkdown bundle: LaTeX is turned on for a text when, after code spans and
# the escapes \\ \$ \` are blanked, one of these matches; directives and emoji by these patterns.
_ST_BLANK = re.compile(r"(?m:^) {0,3}(`{3,}|~{3,})[\s\S]*?(?:\n[ \t]*\1|$)|(?<!`)(`+)[^`\n]+\2(?!`)|\\[\\$`]")
_ST_BLOCK_MATH = re.compile(r"(?<!\$)\$\$+(?!\$)[\s\S]*?\$\$")
_ST_INLINE_MATH = re.compile(r"(?<!\$)\$(?![\s$])[^$\n]*?[^\s$]\$(?!\d)")
_ST_DIRECTIVE = re.compile(r":[a-z][a-z0-9-]*\[")
_ST_EMOJI = re.compile(r":(?!material/|streamlit:)[\w+-][\w_+-]*:")


def turns_on_math(source: str) -> bool:
    blanked = _ST_BLANK.sub("_", source)
    return "$" in source and bool(_ST_BLOCK_MATH.search(blanked) or _ST_INLINE_MATH.search(blanked))


class _Text(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.tags, self.marked, self._in_mark = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_mark = self._in_mark or tag == "mark"
        if tag == "br":
            self.text.append("\n")

    def handle_endtag(self, tag):
        self._in_mark = self._in_mark and tag != "mark"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_mark:
            self.marked.append(data)


def parse_html(html: str) -> _Text:
    p = _Text()
    p.feed(html)
    p.close()
    return p


def markdown(source: str) -> _Text:
    """What a CommonMark renderer (HTML on, GFM strikethrough and tables) makes of `source`."""
    md = MarkdownIt("commonmark", {"html": True}).enable(["strikethrough", "table"])
    return parse_html(md.render(source))


def shown_literally(source: str) -> str:
    """The text a reader sees for markdown `source`; fails if Streamlit would switch LaTeX on for it
    or read a directive or an emoji code in it."""
    assert not turns_on_math(source), source[:400]
    assert not _ST_DIRECTIVE.search(source) and not _ST_EMOJI.search(source), source[:400]
    return "".join(markdown(source).text).strip()


@pytest.mark.parametrize("text", CASES)
def test_escape_markdown_shows_the_text_literally(text):
    esc = escape_markdown(text)
    assert shown_literally(esc) == text
    assert set(markdown(esc).tags) == {"p"}
    assert ":material/" not in esc                   # Streamlit rewrites it in the source, escaped or not


def test_escape_markdown_keeps_line_starts_literal():
    esc = escape_markdown(LINES)
    assert shown_literally(esc) == LINES and set(markdown(esc).tags) == {"p"}


def test_the_reference_sees_what_goes_wrong_without_escaping():
    assert turns_on_math("costs $x$ here") and not turns_on_math("$5 and $10")     # Streamlit's own examples
    assert turns_on_math("<span>$</span> <span>20</span> <span>$</span>")
    assert set(markdown("*bold* [x](y)").tags) == {"p", "em", "a"}


@pytest.mark.parametrize("text", CASES + [LINES])
def test_escape_html_is_literal_in_a_browser_and_in_markdown(text):
    esc = escape_html(text)
    assert "".join(parse_html(f"<pre>{esc}</pre>").text) == text
    inline = markdown(f"**label** <span>{esc}</span>")
    assert not turns_on_math(esc) and not _ST_DIRECTIVE.search(esc) and not _ST_EMOJI.search(esc)
    assert "".join(inline.text).strip() == f"label {text}" and set(inline.tags) == {"p", "strong", "span"}


def test_colored_tokens_shows_tokens_as_text_with_colour_by_value():
    tokens = ["the", "$", "20", "*", "bold", "*", "<b>", "[a](x)", "\\"]
    values = [4.0, -2.0, 1.0, 0.0, -4.0, 3.0, 0.5, -1.0, 2.0]
    row = colored_tokens(tokens, values)
    assert shown_literally(f"**Dense**<br>{row}") == "Dense\n" + " ".join(tokens)
    alphas = [float(a) for a in re.findall(r"rgba\(\d+,\d+,\d+,([\d.]+)\)", row)]
    assert alphas == [1.0, 0.5, 0.25, 0.0, 1.0, 0.75, 0.12, 0.25, 0.5]    # |v| / max |v|, two decimals
    assert re.findall(r"rgba\((\d+,\d+,\d+)", row)[:2] == ["214,39,40", "31,119,180"]   # red up, blue down


def test_continuation_html_marks_one_piece_and_keeps_line_breaks():
    pieces = [" the", " cost", "s", " $20", "\n", "*", "x", "*"]
    html = continuation_html(pieces, 3)
    seen = markdown(f"**Sparse:** {html}")
    assert "".join(seen.text).rstrip() == "Sparse: " + "".join(pieces) and seen.marked == [" $20"]
    assert not turns_on_math(html) and "br" in seen.tags and "em" not in seen.tags
    assert markdown(continuation_html(pieces, None)).marked == []


def test_decoded_pieces_bert_wordpiece():
    tok = shared("tiny-llama").tokenizer                      # tiny causal models borrow BERT's tokenizer
    context, text = "the hat costs", " 15 dollars at the photosynthesis market."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(t.startswith("##") for t in tok.convert_ids_to_tokens(ids))   # the test needs a "##" piece
    pieces = decoded_pieces(tok.decode, tok(context, add_special_tokens=False)["input_ids"], ids)
    assert len(pieces) == len(ids) and "".join(pieces) == " 15 dollars at the photosynthesis market."
    assert not any("#" in p for p in pieces)


def test_decoded_pieces_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat\nthe dog sat"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    context, text = tok.encode("the cat").ids, " sat on the mat\nwith a café"
    ids = tok.encode(text).ids
    raw = [tok.id_to_token(i) for i in ids]
    assert "Ġsat" in raw and "Ċ" in raw and tok.decode(ids[-2:-1]) == "\ufffd"   # markers; é in two bytes
    pieces = decoded_pieces(tok.decode, context, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert not any(c in p for p in pieces for c in "ĠĊ\ufffd")


def test_greedy_continuation_reads_as_text():
    """tiny-llama writes random vocabulary, "##" pieces included; the reference is an independent
    greedy loop and the tokenizer's decode of what it wrote."""
    m = shared("tiny-llama")
    spec = RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5)
    out = greedy_continuation(m, spec, 12)
    seq = m.encode(PROMPT)["input_ids"]
    prompt_len = seq.shape[1]
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m.model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    prompt, gen = seq[0, :prompt_len].tolist(), seq[0, prompt_len:].tolist()
    assert any(t.startswith("##") for t in m.tokenizer.convert_ids_to_tokens(gen))
    head, full = (m.tokenizer.decode(ids) for ids in (prompt, prompt + gen))
    assert full.startswith(head) and "##" not in full
    assert len(out["dense"]) == 12 and "".join(out["dense"]) == full[len(head):]


def test_colored_tokens_on_a_given_scale():
    """Rows drawn on one scale: strength |v| / scale, full at the scale and above; a small row stays pale."""
    row = colored_tokens(["a", "b", "c", "d"], [0.5, -1.0, 2.0, 8.0], scale=4.0)
    alphas = [float(a) for a in re.findall(r"rgba\(\d+,\d+,\d+,([\d.]+)\)", row)]
    assert alphas == [0.12, 0.25, 0.5, 1.0]
    small = colored_tokens(["a", "b"], [0.04, -0.02], scale=4.0)
    assert [float(a) for a in re.findall(r"rgba\(\d+,\d+,\d+,([\d.]+)\)", small)] == [0.01, 0.01]
