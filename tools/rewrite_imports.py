"""Rewrite imports of the top-level `models` and `sparse_ops` to `sam_viz.models` and `sam_viz.sparse_ops`.

The folders stay where they are (models/, sparse_ops/ beside sam_viz/); the wheel installs them as
sam_viz.models and sam_viz.sparse_ops (pyproject.toml's package-dir) so that they cannot collide with
a user's own `models`, and in a clone sam_viz/__init__.py resolves the same two names to the same
folders. Each file is then loaded under one name only: models/__init__.py refuses the old one.

Idempotent: run it again after merging a branch that still writes the old names.

    python -m tools.rewrite_imports          # rewrites tracked and untracked (not ignored) .py files
    python -m tools.rewrite_imports --check  # lists the files it would change; exit 1 if any

What it rewrites, in code and in code held in strings (a `python -c` script, a monkeypatch target):
- `from models import x` / `from models.loading import x`  -> `from sam_viz.models ... import x`
- a dotted name of a submodule, `models.loading` (so `import sparse_ops.mlp` and its uses
  `sparse_ops.mlp.activations`, and "models.loading.DEMO_DIR")       -> `sam_viz.models.loading`
- a bare name in an `import` list, `import models` / `import sys, models`
                                          -> `from sam_viz import models` / `import sys, sam_viz.models as models`
What it cannot see (an import list split across string pieces) fails loudly at import time.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "sparse_ops")


def submodules(package: str) -> list[str]:
    """The package's modules and subpackages, as named in a dotted reference."""
    folder = ROOT / package
    return sorted({p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
                  | {p.parent.name for p in folder.glob("*/__init__.py")})


def _rules() -> list[tuple[re.Pattern, str]]:
    pkg = "|".join(PACKAGES)
    rules = [(re.compile(rf"(?<![\w.])from\s+({pkg})(\s+import\b)"), r"from sam_viz.\1\2")]
    for package in PACKAGES:
        subs = "|".join(submodules(package))
        rules.append((re.compile(rf"(?<![\w.]){package}\.({subs})(?!\w)"), rf"sam_viz.{package}.\1"))
    return rules


# an `import a, b.c as d` statement (not the tail of `from x import ...`): at a line's start, after `;`,
# or at the start of a string
_IMPORT = re.compile(r"(?P<pre>(?:^|[;\"'(])[ \t]*)import[ \t]+(?P<items>[\w.]+(?:[ \t]+as[ \t]+\w+)?"
                     r"(?:[ \t]*,[ \t]*[\w.]+(?:[ \t]+as[ \t]+\w+)?)*)", re.M)
_ITEM = re.compile(r"^(\w+)(?:\s+as\s+(\w+))?$")


def _bare_imports(match: re.Match) -> str:
    items = [i.strip() for i in match["items"].split(",")]
    out = []
    for item in items:
        m = _ITEM.match(item)
        if m and m[1] in PACKAGES:
            out.append(f"sam_viz.{m[1]} as {m[2] or m[1]}")
        else:
            out.append(item)
    if out == items:
        return match[0]
    if len(out) == 1 and out[0] == f"sam_viz.{items[0]} as {items[0]}":
        return f"{match['pre']}from sam_viz import {items[0]}"
    return f"{match['pre']}import {', '.join(out)}"


def rewrite(text: str) -> str:
    for pattern, repl in _rules():
        text = pattern.sub(repl, text)
    return _IMPORT.sub(_bare_imports, text)


def python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    own = Path(__file__).resolve()
    return [ROOT / p for p in listed if (ROOT / p).is_file() and (ROOT / p).resolve() != own]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list the files that would change; change none")
    args = parser.parse_args(argv)
    changed = []
    for path in python_files():
        old = path.read_text(encoding="utf-8")
        new = rewrite(old)
        if new != old:
            changed.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for rel in changed:
        print(rel)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
