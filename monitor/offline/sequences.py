"""Sequence files: the descriptor sequences `eigenwatch extract` writes and
`eigenwatch train` reads (this module owns the format).

One JSON object per text:

    {"id": str, "label": 0 | 1,          # 0 in-distribution, 1 shifted / anomalous
     "model": str, "layers": [int, ...], "descriptor_names": [str, ...],
     "token_counts": [int, ...],         # T steps, ascending
     "x": [[float] * (L·D), ...]}        # T rows: x_t of monitor/eigentrack.py
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEQUENCE_KEYS = ("id", "label", "model", "layers", "descriptor_names", "token_counts", "x")


class SequenceFileError(ValueError):
    """A sequence file that cannot be used; the message names file, line and field."""


def sequence_line(rid: str, label: int, model: str, layers, names, token_counts, x: np.ndarray) -> str:
    return json.dumps({"id": rid, "label": int(label), "model": model, "layers": [int(l) for l in layers],
                       "descriptor_names": list(names), "token_counts": [int(c) for c in token_counts],
                       "x": np.asarray(x, dtype=np.float64).tolist()})


@dataclass
class Sequences:
    ids: list[str]
    labels: np.ndarray  # [N] int
    xs: list[np.ndarray]  # N × [T_i, F]
    model: str
    layers: tuple[int, ...]
    descriptor_names: tuple[str, ...]


def read_sequences(paths: Iterable[str | Path]) -> Sequences:
    """Every line of every file; all must agree on model, layers and descriptor names."""
    ids, labels, xs = [], [], []
    ref: tuple | None = None
    where_ref = ""
    for path in paths:
        path = Path(path)
        try:
            fh = path.open(encoding="utf-8")
        except OSError as exc:
            raise SequenceFileError(f"--data: cannot read {str(path)!r}: {exc.strerror or exc}") from None
        with fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SequenceFileError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise SequenceFileError(f"{where}: expected an object with keys {', '.join(SEQUENCE_KEYS)}")
                missing = [k for k in SEQUENCE_KEYS if k not in obj]
                if missing:
                    raise SequenceFileError(f"{where}: missing {', '.join(missing)} "
                                            "(write sequence files with `eigenwatch extract`)")
                if obj["label"] not in (0, 1) or isinstance(obj["label"], bool):
                    raise SequenceFileError(f"{where}: label: expected 0 (in-distribution) or 1 (shifted), "
                                            f"got {obj['label']!r}")
                key = (obj["model"], tuple(obj["layers"]), tuple(obj["descriptor_names"]))
                if ref is None:
                    ref, where_ref = key, where
                elif key != ref:
                    name, have, want = next((n, a, b) for n, a, b in zip(("model", "layers", "descriptor_names"), key, ref)
                                            if a != b)
                    raise SequenceFileError(f"{where}: {name} {have!r} differs from {want!r} in {where_ref}: "
                                            "train on sequences of one model, layer set and descriptor version")
                width = len(key[1]) * len(key[2])
                try:
                    x = np.asarray(obj["x"], dtype=np.float64).reshape(-1, width)
                except (ValueError, TypeError):
                    raise SequenceFileError(f"{where}: x: expected T rows of {width} numbers "
                                            f"({len(key[1])} layers × {len(key[2])} descriptors)") from None
                if len(x) != len(obj["token_counts"]):
                    raise SequenceFileError(f"{where}: x has {len(x)} rows but token_counts has "
                                            f"{len(obj['token_counts'])}")
                if len(x) == 0:
                    continue
                ids.append(str(obj["id"]))
                labels.append(int(obj["label"]))
                xs.append(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
    if ref is None or not xs:
        raise SequenceFileError("--data: no sequences in " + ", ".join(map(str, paths)))
    return Sequences(ids, np.asarray(labels, dtype=np.int64), xs, ref[0], ref[1], ref[2])
