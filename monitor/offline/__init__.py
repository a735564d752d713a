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
