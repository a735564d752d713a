"""Texts in, for the offline commands: the JSONL reader (bad lines reported
with their line numbers and skipped), tokenisation with one truncation rule
for both engines, and the synthetic corruptions `calibrate` learns from.

Corruptions: `calibrate` only sees in-distribution reference texts, yet two of
its parts learn from positives: the EigenTrack GRU (corrupted copies of the
fit texts) and the weights of the combined score (corrupted copies of the
calibration texts, another seed). Both are made here, deterministically. The
recipe is deliberately generic (none of bench/'s evaluation shifts): dropped
words, duplicated spans, digit/punctuation noise, and a span of another
reference text inserted. Each corruption keeps the text's length in words, so
no detector can win on length alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import OfflineError, log


@dataclass
class InputStats:
    lines: int = 0
    valid: int = 0
    malformed: int = 0
    empty: int = 0
    truncated: int = 0
    too_short: int = 0  # fewer than 2 tokens: no window, no spectrum
    failed: int = 0  # NaN/Inf activations or another per-text error
    problems: list = field(default_factory=list)

    def summary(self, verb: str, done: int) -> str:
        return (f"eigenwatch: {verb} {done} text(s) from {self.lines} line(s): "
                f"{self.malformed} malformed line(s) skipped, {self.empty} empty text(s) skipped, "
                f"{self.too_short} too-short text(s) skipped, {self.failed} failed, "
                f"{self.truncated} truncated")


def read_jsonl(path: str | Path, stats: InputStats) -> list[tuple[str, str]]:
    """[(id, text)] from a JSONL file; bad lines are reported with their line
    numbers on stderr and skipped; empty texts are reported and counted."""
    path = Path(path)
    try:
        fh = path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise OfflineError(f"--texts: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    items: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            stats.lines += 1

            def bad(why: str) -> None:
                stats.malformed += 1
                log(f"{path}:{lineno}: skipped: {why}")

            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                bad(f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                bad(f"expected an object with \"id\" and \"text\", got {type(obj).__name__}")
                continue
            rid, text = obj.get("id"), obj.get("text")
            if isinstance(rid, int) and not isinstance(rid, bool):
                rid = str(rid)
            if not isinstance(rid, str) or not rid:
                bad("\"id\" must be a non-empty string")
                continue
            if not isinstance(text, str):
                bad(f"\"text\" must be a string (id {rid!r})")
                continue
            if rid in seen:
                bad(f"duplicate id {rid!r} (first on line {seen[rid]})")
                continue
            seen[rid] = lineno
            if not text.strip():
                stats.empty += 1
                log(f"{path}:{lineno}: skipped: empty text (id {rid!r})")
                continue
            items.append((rid, text))
    stats.valid = len(items)
    if not items:
        raise OfflineError(f"--texts: {path} holds no usable text ({stats.lines} line(s))")
    return items


def tokenize(tok, items, limit: int | None, stats: InputStats) -> list[tuple[str, list[int]]]:
    """[(id, token ids)]: texts over `limit` tokens truncated (warned, counted),
    texts under 2 tokens skipped (a window needs 2 rows). Both engines use this."""
    out: list[tuple[str, list[int]]] = []
    for rid, text in items:
        enc = tok(text)["input_ids"]
        if limit is not None and len(enc) > limit:
            stats.truncated += 1
            log(f"warning: text {rid!r} has {len(enc)} tokens, truncated to {limit}")
            enc = tok(text, truncation=True, max_length=limit)["input_ids"]
        if len(enc) < 2:
            stats.too_short += 1
            log(f"skipped: text {rid!r} has {len(enc)} token(s); a window needs 2")
            continue
        out.append((rid, [int(t) for t in enc]))
    return out


KINDS = ("drop", "duplicate", "noise", "insert")


def corrupt(text: str, rng: random.Random, pool: list[str]) -> str:
    """One corrupted copy of `text` (kind chosen by `rng`); `pool`: other texts to borrow spans from."""
    return corrupt_kind(text, rng, pool)[0]


def corrupt_kind(text: str, rng: random.Random, pool: list[str]) -> tuple[str, str]:
    """(`corrupt`'s copy, the KINDS entry it was made by)."""
    words = text.split()
    n = len(words)
    kind = KINDS[rng.randrange(len(KINDS))]
    if kind == "drop":  # 30% of the words gone, the rest in order: ungrammatical, same vocabulary
        w = [x for x in words if rng.random() > 0.3] or words[:1]
    elif kind == "duplicate":  # spans of 3-5 words stuttered in place
        w = words[:]
        for _ in range(3):
            k = rng.randint(3, 5)
            i = rng.randrange(max(1, len(w) - k))
            w[i:i] = w[i:i + k]
    elif kind == "noise":  # 8% of the letters become digits or symbols
        return "".join(rng.choice("0123456789#@%&") if c.isalpha() and rng.random() < 0.08 else c
                       for c in text), kind
    else:  # a third of the text replaced by a span of another text
        other = (rng.choice(pool) if pool else text).split()
        k = max(5, n // 3)
        i = rng.randrange(max(1, len(other) - k))
        w = words[: n // 3] + other[i:i + k] + words[n // 3:]
    return " ".join(w[:n]), kind


def corrupt_all(texts: list[str], seed: int = 0) -> list[str]:
    """A corrupted copy of every text, deterministic in `seed`."""
    return corrupt_all_kinds(texts, seed)[0]


def corrupt_all_kinds(texts: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """`corrupt_all`'s copies (the same ones for the same seed) and the kind of each."""
    rng = random.Random(seed)
    pairs = [corrupt_kind(t, rng, texts) for t in texts]
    return [t for t, _ in pairs], [k for _, k in pairs]
