"""A prompt over the token limit: the longest prefix that fits, checked against the tokenizer itself,
and the CLI's --truncate (its error names the option)."""
import json

import pytest

from conftest import shared
from sam_viz.analysis import truncate_to_tokens
from sam_viz.cli import main

TEXT = ("Naïve café owners don't re-open unbelievably early; antidisestablishmentarianism, e.g. 3.14159 "
        "or 'quotes' — and emoji 🙂 too! ") * 3


def n_tokens(loaded, text):
    return loaded.encode(text)["input_ids"].shape[1]


def token_ends(loaded, text):
    enc = loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return sorted({end for _, end in enc["offset_mapping"]})


@pytest.mark.parametrize("spec", ["minilm", "tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("n", [3, 10, 17, 40])
def test_the_longest_prefix_that_fits(spec, n):
    """At most n tokens; the prefix up to the next token's end would be over n; cut where a token ends."""
    loaded = shared(spec)
    out = truncate_to_tokens(loaded, TEXT, n)
    assert TEXT.startswith(out) and 0 < len(out) < len(TEXT)
    assert n_tokens(loaded, out) <= n
    ends = token_ends(loaded, TEXT)
    assert len(out) in ends
    assert n_tokens(loaded, TEXT[:min(e for e in ends if e > len(out))]) > n


def test_text_within_the_limit_is_kept_whole_and_nothing_fits_in_too_little():
    loaded = shared("minilm")                        # [CLS] and [SEP] count: 2 tokens leave no room
    assert truncate_to_tokens(loaded, TEXT, n_tokens(loaded, TEXT)) == TEXT
    assert truncate_to_tokens(loaded, TEXT, 2) == ""


def test_cli_names_truncate_and_truncate_analyses_the_first_tokens(capsys):
    long = " ".join(f"word{i % 7}" for i in range(400))                 # 800 tokens for tiny-llama
    args = ["analyze", "--model", "tiny-llama", "--prompt", long, "--json"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt is 800 tokens; the limit for tiny-llama is 512") and "--truncate" in err
    assert len(err.strip().splitlines()) == 1
    assert main(args + ["--truncate"]) == 0
    out = capsys.readouterr()
    tokens = json.loads(out.out)["tokens"]
    assert len(tokens) == 512 and tokens[:4] == ["word", "##0", "word", "##1"]
    assert "analysing the first 512 tokens" in out.err
