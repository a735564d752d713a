"""The offline tools: run a model over texts with the same tap as live serving
and calibrate, score, extract, train and report (`eigenwatch calibrate | score
| extract | train | report`). torch / transformers / vLLM load inside the
commands that need them.

`OfflineError` is a user-facing error: the CLI prints it and exits 2.
"""

from __future__ import annotations

import sys


class OfflineError(Exception):
    """A user-facing error: the CLI prints it and exits 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_out(path: str, flag: str = "--out", example: str = "out.json") -> None:
    """Refuse an output path that cannot be written before a long run starts
    rather than after it: a folder, a parent that is a file, no write permission."""
    import os
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise OfflineError(f"{flag}: {path} is a folder; give a file name, e.g. {p / example}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # folders that do not exist yet are created
    if not parent.is_dir():
        raise OfflineError(f"{flag}: cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OfflineError(f"{flag}: cannot write {path}: permission denied")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag and exits 2)."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v
