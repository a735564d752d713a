"""Descriptor sequences: the input of the EigenTrack risk model (numpy only).

One time step of a request is the tap's frames of all monitored layers at the
same token count, their descriptor vectors concatenated in ascending layer
order: x_t = [desc(layer_0) | desc(layer_1) | ...], length L·D. The offline
commands (`eigenwatch extract`, `calibrate`, `score`) and the live sidecar
build x_t with the functions here, so the model sees the same features in
both places.

Non-finite descriptor values (a documented NaN for an undefined statistic, or
anything a damaged frame carries) become 0 in x_t.

Sequence files (`eigenwatch extract --out SEQ.jsonl`, read by `eigenwatch
train --data`) hold one JSON object per text:

    {"id": str, "label": 0 | 1,          # 0 in-distribution, 1 shifted / anomalous
     "model": str, "layers": [int, ...], "descriptor_names": [str, ...],
     "token_counts": [int, ...],         # T steps, ascending
     "x": [[float] * (L·D), ...]}        # T rows
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


def step_vector(descs: dict[int, np.ndarray], layers: tuple[int, ...]) -> np.ndarray:
    """x_t from {layer: descriptor vector [D]} for every layer in `layers`: [L·D] float64, finite."""
    x = np.concatenate([np.asarray(descs[l], dtype=np.float64) for l in layers])
    x[~np.isfinite(x)] = 0.0  # = nan_to_num(nan=0, posinf=0, neginf=0), cheaper on short vectors
    return x


def frames_to_sequence(frames: Iterable, layers: tuple[int, ...]) -> tuple[list[int], np.ndarray]:
    """(token_counts [T], x [T, L·D]) from frames with .layer, .token_count and
    .descriptors. Steps where some layer has no frame are dropped; of several
    frames of one layer at one token count (a final frame repeating the last
    stride frame) the last one counts."""
    by_count: dict[int, dict[int, np.ndarray]] = {}
    for f in frames:
        if f.layer in layers:
            by_count.setdefault(int(f.token_count), {})[int(f.layer)] = np.asarray(f.descriptors)
    counts = [c for c in sorted(by_count) if len(by_count[c]) == len(layers)]
    if not counts:
        return [], np.zeros((0, 0))
    return counts, np.stack([step_vector(by_count[c], layers) for c in counts])


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
