"""Evaluation texts for the detectors, built deterministically from text that
ships with every CPython and Debian install (nothing is downloaded).

In-distribution: technical English prose — the paragraphs of CPython's pydoc
topics (`pydoc_data.topics`) and the docstrings of stdlib modules, cut into
chunks of 40–90 words. The chunks are shuffled and split by a fixed seed into
disjoint parts: reference (what `eigenwatch calibrate` sees) and held-out
in-distribution.

Shifts of the held-out texts (each keeps the text's length in words):

  vocabulary kept, meaning or order broken (the hard ones)
    word_shuffle   the words of the text in a random order
    reversed       the words in reverse order
    word_swap      40% of the words replaced by random words of the corpus vocabulary
    splice         first half of one text + second half of an unrelated one, per sentence
                   alternating between the two (each sentence is fluent, the text is not)
    repetition     a 6–10 word phrase of the text repeated to its length (a generation loop)
  vocabulary / domain shift
    garbled        20% of the letters replaced by random letters
    legal          chunks of the licence texts in /usr/share/common-licenses
    code           chunks of CPython's own stdlib source code

`eigenwatch calibrate` learns its GRU and the weights of the combined score
from corrupted copies of the reference texts (monitor/offline/texts.py: word drops,
span duplication, 8% digit noise, spans of other texts inserted), a recipe
that is none of the shifts above: the table measures transfer to shifts the
detectors never saw.
"""

from __future__ import annotations

import glob
import json
import pkgutil
import random
import re
import sys
import sysconfig
import warnings
from pathlib import Path


SHIFTS = ("word_shuffle", "reversed", "word_swap", "splice", "repetition", "garbled", "legal", "code")
HARD = ("word_shuffle", "reversed", "word_swap", "splice", "repetition")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _prose_paragraphs() -> list[str]:
    import pydoc_data.topics as topics

    out = []
    sources = [topics.topics[k] for k in sorted(topics.topics)]
    # Docstrings of pure-Python stdlib modules: more prose of the same register.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in sorted(pkgutil.iter_modules([str(stdlib)]), key=lambda m: m.name):
            if info.name.startswith(("_", "test", "idlelib", "tkinter", "turtle", "antigravity", "this")):
                continue
            path = stdlib / f"{info.name}.py"
            if not path.exists():
                continue
            src = path.read_text(encoding="utf-8", errors="replace")
            for m in re.finditer(r'"""(.*?)"""', src, flags=re.S):
                sources.append(m.group(1))
    for doc in sources:
        for para in re.split(r"\n\s*\n", doc):
            lines = para.splitlines()
            # prose only: no indented code, no doctest, no tables or rules
            if any(l.startswith("    ") or ">>>" in l or "...." in l for l in lines):
                continue
            text = _clean(" ".join(lines))
            if len(text.split()) >= 20 and not re.search(r"[*=~\-]{4}|[{}]|::", text):
                out.append(text)
    return sorted(set(out))


def _chunk(texts: list[str], rng: random.Random, lo: int = 40, hi: int = 90) -> list[str]:
    words: list[str] = []
    out = []
    for t in texts:
        words.extend(t.split())
        while len(words) >= hi:
            n = rng.randint(lo, hi)
            out.append(" ".join(words[:n]))
            words = words[n:]
    return out


def in_distribution(seed: int = 0) -> list[str]:
    """The in-distribution chunks in a random order. The chunks themselves are
    shuffled, not only the paragraphs: consecutive chunks often come from one
    paragraph, and `eigenwatch calibrate` splits its reference texts at random
    into fit and calibration texts, so neighbours land on both sides of that
    split. Shuffling the chunks before cutting reference from held-out gives
    the held-out texts the same relation to the fit texts as the calibration
    texts have (exchangeable, what a conformal false-alarm rate is about).
    Cutting the ordered chunks instead made held-out texts look less typical
    than calibration texts to the GRU (KS p = 0.02, alert rate 8.3% at 5%)."""
    rng = random.Random(seed)
    paras = _prose_paragraphs()
    rng.shuffle(paras)
    chunks = _chunk(paras, rng)
    rng.shuffle(chunks)
    return chunks


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def shift(kind: str, text: str, rng: random.Random, pool: list[str]) -> str:
    """One shifted version of `text`; `pool` gives other in-distribution texts / sources."""
    words = text.split()
    n = len(words)
    if kind == "word_shuffle":
        w = words[:]
        rng.shuffle(w)
        return " ".join(w)
    if kind == "reversed":
        return " ".join(reversed(words))
    if kind == "word_swap":
        vocab = sorted({w for t in pool for w in t.split()})
        return " ".join(rng.choice(vocab) if rng.random() < 0.4 else w for w in words)
    if kind == "splice":
        other = _sentences(rng.choice(pool))
        mine = _sentences(text)
        out = []
        for i in range(max(len(mine), 2)):
            src = mine if i % 2 == 0 else other
            out.append(src[(i // 2) % len(src)])
        return " ".join(" ".join(out).split()[:n])
    if kind == "repetition":
        k = rng.randint(6, 10)
        start = rng.randrange(max(1, n - k))
        phrase = words[start:start + k]
        return " ".join((phrase * (n // len(phrase) + 1))[:n])
    if kind == "garbled":
        return "".join(rng.choice(LETTERS) if c.isalpha() and rng.random() < 0.2 else c for c in text)
    if kind in ("legal", "code"):
        src = rng.choice(pool)
        sw = src.split()
        start = rng.randrange(max(1, len(sw) - n))
        return " ".join(sw[start:start + n])
    raise ValueError(f"shift: unknown kind {kind!r}; expected one of {', '.join(SHIFTS)}")


def _legal_sources() -> list[str]:
    out = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        try:
            out.append(_clean(Path(path).read_text(encoding="utf-8", errors="replace")))
        except (OSError, IsADirectoryError):
            continue
    if not out:  # not a Debian machine: Python's own licence text
        out.append(_clean((Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                           / "LICENSE.txt").read_text()))
    return out


def _code_sources() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "csv.py", "heapq.py", "bisect.py", "shlex.py", "fnmatch.py", "glob.py",
             "colorsys.py", "statistics.py", "fractions.py"]
    out = []
    for name in names:
        p = stdlib / name
        if p.exists():
            src = re.sub(r'""".*?"""', "", p.read_text(encoding="utf-8"), flags=re.S)  # code, not prose
            src = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith("#"))
            out.append(_clean(src))
    return out


def build(out_dir: str | Path, seed: int = 0, n_ref: int = 300, n_eval: int = 350, n_shift: int = 100) -> dict:
    """Write the JSONL files; returns {name: path}. Sizes are upper bounds (the corpus may be smaller):
    reference (for `eigenwatch calibrate`), heldout (in-distribution, never calibrated on) and one
    file per shift, made from the first n_shift held-out texts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    texts = in_distribution(seed)
    if len(texts) < n_ref + n_eval:
        scale = len(texts) / (n_ref + n_eval)
        n_ref, n_eval = int(n_ref * scale), int(n_eval * scale)
    ref = texts[:n_ref]
    held = texts[n_ref:n_ref + n_eval]
    files: dict[str, Path] = {}

    def dump(name: str, items: list[str]) -> None:
        path = out_dir / f"{name}.jsonl"
        with path.open("w") as fh:
            for i, t in enumerate(items):
                fh.write(json.dumps({"id": f"{name}-{i}", "text": t}) + "\n")
        files[name] = path

    dump("reference", ref)
    dump("heldout", held)
    sources = {"legal": _legal_sources(), "code": _code_sources()}
    base = held[:n_shift]
    for kind in SHIFTS:
        pool = sources.get(kind, held)
        dump(kind, [shift(kind, t, rng, pool) for t in base])
    return {k: str(v) for k, v in files.items()}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for name, path in build(a.out_dir, a.seed).items():
        print(f"{name:12s} {sum(1 for _ in open(path)):5d}  {path}")
