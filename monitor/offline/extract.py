"""`eigenwatch extract`: the descriptor sequences of texts, labelled, written
as a sequence file (monitor/offline/sequences.py) for `eigenwatch train`."""

from __future__ import annotations

from pathlib import Path

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES

from . import check_out, log
from .calibrate import tap_settings
from .engines import model_info, open_engine
from .features import add_tap_args, extract
from .sequences import sequence_line
from .texts import InputStats, read_jsonl


def extract_sequences(args) -> int:
    check_out(args.out, example="sequences.jsonl")  # before the run, not after it
    tap = tap_settings(args)
    tap.check()
    stats = InputStats()
    items = read_jsonl(args.texts, stats)
    info = model_info(args.model)
    engine = open_engine(args.engine, info, tap)
    try:
        ids, feats = extract(engine, info, items, args.max_length, stats, "extract")
        tapped = tuple(engine.layers)
    finally:
        engine.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for rid, f in zip(ids, feats):
            fh.write(sequence_line(rid, args.label, info.key, tapped, DESCRIPTOR_NAMES,
                                   f["token_counts"], f["sequence"]) + "\n")
    log(stats.summary("extracted", len(feats)))
    log(f"eigenwatch extract: wrote {out}: {len(feats)} sequence(s), label {args.label}, "
        f"model {info.key}, layers {list(tapped)}")
    return 0


def add_args(p) -> None:
    p.add_argument("--model", required=True, help="model directory, or 'tiny' / 'minilm'")
    p.add_argument("--texts", required=True, help="texts: JSONL, one {\"id\", \"text\"} per line")
    p.add_argument("--label", type=int, required=True, choices=[0, 1],
                   help="0: in-distribution texts, 1: shifted / anomalous texts")
    p.add_argument("--out", required=True, help="sequence file to write (JSONL, input of `eigenwatch train`)")
    add_tap_args(p)
