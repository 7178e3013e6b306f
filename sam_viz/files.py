"""A user's text file, read safely: one sentence (InputError) for a path that is not a regular
file, a file over a size bound, or bytes that are not UTF-8 text. `eval --text` and the corpus
reader of `profile` / `calibrate --corpus` share it."""
from __future__ import annotations

import stat
from pathlib import Path

from sam_viz.models import InputError


def read_bytes(path: Path, label: str, name: str, max_bytes: int) -> bytes:
    """At most `max_bytes` of a regular file (a device such as /dev/zero would never end, and a
    symlink to one is followed here before any read). `label` ("text file") and `name` (as the
    user wrote it) word the errors."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{label} '{name}' does not exist") from None
    except ValueError:                                      # os.stat refuses a NUL in a path
        raise InputError(f"the {label}'s name holds a NUL character") from None
    except OSError as exc:
        raise _unreadable(label, name, exc) from None
    if not stat.S_ISREG(mode):
        raise InputError(f"'{name}' is not a regular file (a directory or a device?); give a {label}")
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise _unreadable(label, name, exc) from None
    if len(data) > max_bytes:
        raise InputError(f"{label} '{name}' is over {max_bytes >> 20:,} MB")
    return data


def decode_text(data: bytes, label: str, name: str) -> str:
    """UTF-8 text without NUL characters, or one sentence saying why not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{label} '{name}' is not UTF-8 text (a binary file?)") from None
    if "\x00" in text:
        raise InputError(f"{label} '{name}' is binary (it holds NUL bytes), not text")
    return text


def _unreadable(label: str, name: str, exc: OSError) -> InputError:
    return InputError(f"cannot read {label} '{name}' ({exc.strerror or type(exc).__name__})")
