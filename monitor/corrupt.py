"""Synthetic anomalies made from in-distribution text, for `eigenwatch calibrate`.

`calibrate` only sees in-distribution reference texts, yet two of its parts
learn from positives: the EigenTrack GRU (corrupted copies of the fit texts)
and the weights of the combined score (corrupted copies of the calibration
texts, another seed). Both are made here, deterministically. The recipe is deliberately generic (none of bench/'s evaluation
shifts): dropped words, duplicated spans, digit/punctuation noise, and a span
of another reference text inserted. Each corruption keeps the text's length in
words, so no detector can win on length alone.
"""

from __future__ import annotations

import random

KINDS = ("drop", "duplicate", "noise", "insert")


def corrupt(text: str, rng: random.Random, pool: list[str]) -> str:
    """One corrupted copy of `text` (kind chosen by `rng`); `pool`: other texts to borrow spans from."""
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
        return "".join(rng.choice("0123456789#@%&") if c.isalpha() and rng.random() < 0.08 else c for c in text)
    else:  # a third of the text replaced by a span of another text
        other = (rng.choice(pool) if pool else text).split()
        k = max(5, n // 3)
        i = rng.randrange(max(1, len(other) - k))
        w = words[: n // 3] + other[i:i + k] + words[n // 3:]
    return " ".join(w[:n])


def corrupt_all(texts: list[str], seed: int = 0) -> list[str]:
    """A corrupted copy of every text, deterministic in `seed`."""
    rng = random.Random(seed)
    return [corrupt(t, rng, texts) for t in texts]
