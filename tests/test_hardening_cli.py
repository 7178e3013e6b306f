"""Search for bad input to the CLI (issue 15): hypothesis draws a command, its flags and hostile values
(empty, whitespace, control and format characters, lone surrogates as an OS hands them to argv,
100k characters, numbers as nan / inf / 1e400 / -0, paths that leave the allowed roots, prompts
that tokenize to nothing) and runs `sam_viz.cli.main(argv)` in-process. Every input must give exit 0,
or exit 2 with one `error:` line on stderr; never an exception, an exit 1 or a traceback.

The budget is small here (CI); `python -m bench.hardening` runs the same properties with a larger
one (SAM_VIZ_HARDENING_EXAMPLES) and writes how many inputs each surface was given.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sam_viz import models
from conftest import TINY, shared
from sam_viz.models import BUILTIN_SPECS
from sam_viz.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("SAM_VIZ_HARDENING_EXAMPLES", "15"))
TRIED: Counter = Counter()
PROPS = settings(deadline=None, max_examples=EXAMPLES, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))

INVISIBLE = "\u200b\u200c\u200d\u202a\u202e\u2060\u2066\ufeff\u00ad\x00\x01\x7f"
HOSTILE = ["", " ", "\t\n\r", "\u202e", "\u200b" * 3, "\u202e\u200b", "\x00", "\x1b[31m", "\udcff", "\ud800",
           "x" * 100_000, "word " * 700, "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "-0", "-0.0", "0", "1",
           "-1", "1e-400", "0x10", "1_0", " 3 ", "[]", "{}", "None", "True", "--json", "-", "=1+1",
           "<img src=x onerror=alert(1)>", "'; DROP TABLE runs; --"]
TEXT = st.sampled_from(HOSTILE) | st.text(max_size=40) | st.text(st.sampled_from(INVISIBLE), min_size=1, max_size=6)
NUMBER = (st.sampled_from(["0.5", "0.25", "1", "0.05"]) | st.floats(allow_nan=True, allow_infinity=True).map(repr)
          | st.integers(-10**400, 10**400).map(str) | TEXT)
BAD_MODELS = ["/etc", "/etc/passwd", "..", "../../x", "~", "~root", "hf:../../x", "hf:a/b/c", "hf:a", "hf:",
              "hf:org/none-such", "checkpoints/../../..", "tiny-llama/../..", "minilm\n", "MINILM", "\u202e",
              "x" * 2000, "/dev/zero", "file:///etc/passwd", "models/demo/../../sam_viz"]
MODEL = st.sampled_from(TINY) | st.sampled_from(BAD_MODELS) | TEXT
POLICY = st.sampled_from(["dense", "topk"]) | TEXT           # calibrated policies: tests/test_sparsity.py
KERNEL = st.sampled_from(["reference", "cpu", "triton"]) | TEXT
FLAG = object()                                              # a flag without a value


def _text_file(content) -> str:
    path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"sam-viz-hardening-{abs(hash(content)) % 10**8}.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return str(path)


TEXT_FILE = (st.sampled_from(["/nonexistent/file.txt", "/etc", "/dev/zero", "/dev/null", "", "\x00", "models/demo"])
             | st.sampled_from([b"", b" \n", b"\x00\x01", b"\xff\xfe", "\u200b\u202e".encode(), b"<|endoftext|>",
                                b"one two three " * 50]).map(_text_file))

# One line per command: its flags, each with the values to draw (FLAG: none). `profile` is one more line.
COMMANDS = {
    "analyze": {"--model": MODEL, "--prompt": TEXT, "--policy": POLICY, "--density": NUMBER, "--kernel": KERNEL,
                "--json": FLAG, "--truncate": FLAG},
    "attribute": {"--model": MODEL, "--prompt": TEXT, "--policy": POLICY, "--density": NUMBER, "--kernel": KERNEL,
                  "--method": st.sampled_from(["ig", "ixg"]) | TEXT,
                  "--steps": st.sampled_from(["2", "3", "301", "1"]) | NUMBER, "--target": TEXT,
                  "--query": TEXT, "--json": FLAG},
    "eval": {"--model": MODEL, "--policy": POLICY, "--density": NUMBER, "--kernel": KERNEL, "--text": TEXT_FILE,
             "--max-tokens": st.integers(1, 300).map(str) | NUMBER,
             "--context": st.integers(1, 64).map(str) | NUMBER, "--json": FLAG},
    "calibrate": {"--model": (st.sampled_from(BAD_MODELS) | TEXT).filter(lambda m: m.strip() not in BUILTIN_SPECS),
                  "--force": FLAG},                  # a real calibration takes minutes: tests/test_sparsity.py
    "profile": {"--model": MODEL, "--corpus": st.sampled_from(["builtin:calibration", "builtin:", "builtin:x"])
                | TEXT_FILE | TEXT, "--text-column": TEXT, "--policy": POLICY, "--density": NUMBER,
                "--max-tokens": st.integers(1, 300).map(str) | NUMBER, "--context": st.integers(1, 64).map(str) | NUMBER,
                "--engine": (st.just("local") | TEXT).filter(lambda e: e != "ray"),   # ray: tests/test_profile_ray.py
                "--kernel": KERNEL, "--resume": FLAG, "--json": FLAG},
}
REQUIRED = {"analyze": ("--prompt",), "attribute": ("--prompt",), "eval": ("--max-tokens",),   # eval: bounded work
            "calibrate": ("--model",), "profile": ("--max-tokens",)}


@pytest.fixture(scope="module", autouse=True)
def cached_models(request, tmp_path_factory):
    """Models loaded once (as the app's cache does), not once per input; the counts at the end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTEST_TMP", str(tmp_path_factory.mktemp("files")))
        mp.setenv("SAM_VIZ_PROFILE_DIR", str(tmp_path_factory.mktemp("profiles")))
        mp.setattr(models, "load_model", shared)
        mp.delenv("SAM_VIZ_DEBUG", raising=False)
        yield
    report(request, "cli", TRIED)


def report(request, surface: str, counts: Counter) -> None:
    """Print the inputs tried per surface; also into SAM_VIZ_HARDENING_COUNTS (a JSON file) when set."""
    line = f"hardening {surface}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        plugins.get_plugin("terminalreporter").write_line(line)
    out = os.environ.get("SAM_VIZ_HARDENING_COUNTS")
    if out:
        data = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
        data.setdefault(surface, {}).update(counts)
        Path(out).write_text(json.dumps(data, indent=1))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def check(argv: list[str]) -> None:
    """exit 0, or exit 2 and one `error:` line (the last one) on stderr; --json prints one object."""
    TRIED[argv[0]] += 1
    rc, out, err = run_cli(argv)
    TRIED[f"{argv[0]} exit {rc}"] += 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc in (0, 2), (rc, err[-500:])
    assert "Traceback" not in err
    if rc == 2:
        assert lines and lines[-1].startswith("error: ") and sum(l.startswith("error") for l in lines) == 1, err
    elif "--json" in argv:
        assert isinstance(json.loads(out), dict)


@st.composite
def argv(draw, command: str | None = None) -> list[str]:
    command = command or draw(st.sampled_from(sorted(COMMANDS)))
    flags = COMMANDS[command]
    chosen = set(REQUIRED.get(command, ())) | set(draw(st.lists(st.sampled_from(sorted(flags)), unique=True)))
    out = [command]
    for flag in sorted(chosen):
        if flags[flag] is FLAG:
            out.append(flag)
        else:
            value = draw(flags[flag])
            out += [f"{flag}={value}"] if draw(st.booleans()) else [flag, value]
    return out


@PROPS
@given(argv("analyze"))
@example(["analyze", "--model", "tiny-llama", "--prompt", "\u202e\u200b"])       # the reported bug
@example(["analyze", "--model", "tiny-gpt2", "--prompt", "\u200b", "--truncate"])
def test_analyze_never_fails_badly(args):
    check(args)


@PROPS
@given(argv("attribute"))
@example(["attribute", "--model", "tiny-llama", "--prompt", "\u202e\u200b", "--steps", "2"])
@example(["attribute", "--prompt", "\udcff"])                        # lone surrogate: TypeError in the tokenizer
@example(["attribute", "--kernel", "\x1e", "--prompt", "x"])             # the echoed value broke the error line
def test_attribute_never_fails_badly(args):
    check(args)


@PROPS
@given(argv("eval"))
@example(["eval", "--model", "tiny-llama", "--max-tokens", "200", "--text", "/dev/zero"])   # hung: read forever
@example(["eval", "--max-tokens", "128", "--text", "\x00"])           # ValueError: embedded null byte
def test_eval_never_fails_badly(args):
    check(args)


@PROPS
@given(argv("profile"))
@example(["profile", "--model", "tiny-llama", "--corpus", "builtin:calibration", "--max-tokens", "128", "--context",
          "16", "--json"])
@example(["profile", "--model", "tiny-bert", "--corpus", "builtin:calibration", "--max-tokens", "64", "--context", "16",
          "--policy", "topk", "--density", "1e-9"])
def test_profile_never_fails_badly(args):
    check(args)


@st.composite
def likely_profile(draw) -> list[str]:
    """Mostly valid profile runs (the search above mostly meets the validation): a tiny model, the
    built-in or a hostile text file, small bounded work, densities near the edges."""
    return ["profile", "--model", draw(st.sampled_from(TINY)),
            "--corpus", draw(st.just("builtin:calibration") | TEXT_FILE),
            "--max-tokens", str(draw(st.integers(16, 200))), "--context", str(draw(st.integers(1, 40))),
            "--policy", draw(st.sampled_from(["dense", "topk"])),
            "--density", draw(st.sampled_from(["1", "0.5", "1e-9", "0.999", "0.01"])), "--json"]


@settings(PROPS, max_examples=max(4, EXAMPLES // 2))
@given(likely_profile())
def test_profile_runs_that_pass_validation_never_fail_badly(args):
    check(args)


@PROPS
@given(argv("calibrate"))
def test_calibrate_never_fails_badly(args):
    check(args)


ZERO_TOKEN_PROMPTS = ("\u202e\u200b", "\u200b" * 5, "\ufeff\u2060", "\x00\u200d")


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_a_prompt_of_invisible_characters_is_one_sentence_on_every_builtin_model(spec):
    """Zero real tokens (the tokenizer alone, without special tokens, says how many) -> exit 2 and
    one sentence; a tokenizer that keeps them (byte-level BPE) -> an analysis of those tokens."""
    loaded = shared(spec)
    for prompt in ZERO_TOKEN_PROMPTS:
        TRIED["analyze"] += 1
        rc, out, err = run_cli(["analyze", "--model", spec, "--prompt", prompt, "--json"])
        real = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if real == 0:
            assert rc == 2 and err.startswith("error: the prompt has no tokens for") and err.count("\n") == 1, err
        else:
            assert rc == 0, err
            assert len(json.loads(out)["tokens"]) >= real


def test_the_zero_token_prompt_exits_2_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "sam_viz", "analyze", "--model", "tiny-llama", "--prompt",
                           "\u202e\u200b"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the prompt has no tokens")
