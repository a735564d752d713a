"""`eigenwatch signatures add | head | encode`: lexical signatures offline, through
the same head and kernel as the live tap (hooks/signatures.py, kernels/sparton.py),
with transformers (the HF engine of monitor/offline/engines.py).

    eigenwatch signatures add --model minilm --layer 4 --texts bad.jsonl \\
        --reference ordinary.jsonl --out sigs.npz          # the sidecar's --signatures
    eigenwatch signatures head --model minilm --out head.npz  # the sidecar's --sparse-head
    eigenwatch signatures encode --model minilm --layer 4 --texts t.jsonl --out vectors.jsonl

The threshold of `add`: each --reference text (ordinary traffic) is compared with
every signature of the index; the threshold sits `--margin` of the way from the
highest such cosine similarity to 1 (an exact replay). The reference signatures are
kept in the file, so a later `add` to the same --out recalibrates over all entries.
Or set it with --threshold. Errors raise OfflineError (exit 2); torch loads inside.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from eigenwatch.monitor.offline import OfflineError, log
from eigenwatch.monitor.sidecar.signatures import (INDEX_FORMAT, SignatureFileError, save_head, save_npz,
                                                   similarities)

DEFAULT_TOPK = 64


def add_args(p) -> None:
    sub = p.add_subparsers(dest="signatures_command", required=True, metavar="{add,head,encode}")

    def model_args(q, layer: bool = True) -> None:
        q.add_argument("--model", required=True, help="model directory, or 'minilm' / 'tiny'")
        if layer:
            q.add_argument("--layer", type=int, required=True,
                           help="the block whose rows are read (negative counts from the end); the live tap's "
                                "EIGENWATCH_SIGNATURE_LAYER must name the same layer")
            q.add_argument("--max-length", type=int, default=None,
                           help="truncate texts to this many tokens (default: the model's max positions)")

    a = sub.add_parser("add", help="add known-bad texts' signatures to an index (the sidecar's --signatures)")
    model_args(a)
    a.add_argument("--texts", required=True, metavar="BAD.jsonl", help="known-bad texts, one {\"id\", \"text\"} per line")
    a.add_argument("--out", required=True, metavar="SIGS.npz",
                   help="index to write, atomically; an existing one (same model, layer, top-k) is added to")
    a.add_argument("--topk", type=int, default=DEFAULT_TOPK,
                   help="terms kept per signature, like the tap's EIGENWATCH_SIGNATURE_TOPK (default %(default)s)")
    cal = a.add_mutually_exclusive_group()
    cal.add_argument("--reference", metavar="ORDINARY.jsonl",
                     help="ordinary texts that must not match: the threshold is calibrated on them")
    cal.add_argument("--threshold", type=float, default=None,
                     help="a fixed cosine-similarity threshold in (0, 1] instead")
    a.add_argument("--margin", type=float, default=0.5,
                   help="with --reference: the threshold sits this fraction of the way from the highest reference "
                        "similarity to 1, in (0, 1) (default %(default)s)")

    h = sub.add_parser("head", help="write the model's sparse head (unembedding, norm, vocabulary) for --sparse-head")
    model_args(h, layer=False)
    h.add_argument("--out", required=True, metavar="HEAD.npz", help="head file to write, atomically")

    e = sub.add_parser("encode", help="texts -> sparse lexical vectors (JSONL), offline")
    model_args(e)
    e.add_argument("--texts", required=True, metavar="TEXTS.jsonl")
    e.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="terms per text (default %(default)s)")
    e.add_argument("--out", default="-", help="JSONL to write, one {id, terms: [[token, id, weight], ...]} per text "
                                              "(default: stdout)")


def run(args) -> int:
    return {"add": add, "head": head, "encode": encode}[args.signatures_command](args)


# --------------------------------------------------------------------------- the model


class Encoder:
    """A transformers model, its head (hooks/signatures.py find_head) and tokenizer."""

    def __init__(self, model: str, layer: int | None):
        from eigenwatch.hooks.signatures import find_head
        from eigenwatch.monitor.offline.engines import HFEngine, Tap, model_info, num_layers

        self.info = info = model_info(model)  # OfflineError for an unknown --model
        n = num_layers(info.config)
        if n is None:
            raise OfflineError(f"--model: {info.path}/config.json gives no layer count (num_hidden_layers)")
        if layer is not None and not -n <= layer < n:
            raise OfflineError(f"--layer: {layer} is out of range for a model with {n} layers "
                               f"(accepted: {-n}..{n - 1})")
        self.layer = None if layer is None else layer % n
        self.engine = HFEngine(info, Tap(layers=(self.layer if self.layer is not None else n - 1,)))
        try:
            self.head = find_head(self.engine.model, getattr(info.config, "vocab_size", None))
        except ValueError as exc:
            raise OfflineError(f"--model: {exc}") from None

    def vocab(self) -> list[str]:
        tok = self.info.tokenizer
        v = self.head.vocab_size
        toks = tok.convert_ids_to_tokens(list(range(min(v, len(tok)))))
        return [t if isinstance(t, str) else "" for t in toks] + [""] * (v - min(v, len(tok)))

    def signatures(self, path: str, flag: str, topk: int, max_length: int | None):
        """[(id, ids [k] int64, weights [k] float32)] of a texts file, terms of weight 0 dropped."""
        import torch

        from eigenwatch.hooks.signatures import layer_rows, topk_terms
        from eigenwatch.monitor.offline.embed import read_texts
        from eigenwatch.monitor.offline.texts import InputStats, tokenize

        if max_length is not None and max_length < 2:
            raise OfflineError(f"--max-length: expected an integer >= 2, got {max_length}")
        items = read_texts(path, flag)
        stats = InputStats()
        limit = max_length or self.info.max_positions
        out = []
        for rid, ids in tokenize(self.info.tokenizer, items, limit, stats):
            rows = layer_rows(self.engine.model, self.layer, ids)  # [T, D]
            if not torch.isfinite(rows).all():
                log(f"skipped: text {rid!r} gives NaN or Inf hidden states at layer {self.layer}")
                continue
            w = self.head.encode(rows[None], torch.ones((1, rows.shape[0]), dtype=torch.bool, device=rows.device))
            tid, tw = topk_terms(w, topk)
            tid, tw = tid[0].cpu().numpy(), tw[0].cpu().numpy()
            keep = tw > 0
            out.append((rid, tid[keep].astype(np.int64), tw[keep].astype(np.float32)))
        if not out:
            raise OfflineError(f"{flag}: none of the {len(items)} text(s) in {path} gave a signature "
                               "(see the messages above)")
        return out

    def close(self) -> None:
        self.engine.close()


def _check_topk(k: int, v: int | None = None) -> None:
    if k < 1 or (v is not None and k > v):
        raise OfflineError(f"--topk: expected an integer in 1..{v or 'V'}, got {k}")


def _pad(sigs, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(sigs), k), dtype=np.int64)
    w = np.zeros((len(sigs), k), dtype=np.float32)
    for i, (_, a, b) in enumerate(sigs):
        ids[i, :a.size], w[i, :b.size] = a, b
    return ids, w


def _unit(w: np.ndarray) -> np.ndarray:
    return w / np.maximum(np.linalg.norm(w.astype(np.float64), axis=1, keepdims=True), 1e-30)


# --------------------------------------------------------------------------- add


def add(args) -> int:
    if args.threshold is not None and not (math.isfinite(args.threshold) and 0 < args.threshold <= 1):
        raise OfflineError(f"--threshold: expected a cosine similarity in (0, 1], got {args.threshold}")
    if not (math.isfinite(args.margin) and 0 < args.margin < 1):
        raise OfflineError(f"--margin: expected a number in (0, 1), got {args.margin}")
    old = _existing(args.out)
    if old is None and args.reference is None and args.threshold is None:
        raise OfflineError("--reference: a new index needs ordinary texts to calibrate its threshold on "
                           "(--reference ORDINARY.jsonl), or a fixed --threshold")
    from eigenwatch.monitor.offline.embed import read_texts

    for path, flag in ((args.texts, "--texts"), (args.reference, "--reference")):
        if path is not None:
            read_texts(path, flag)  # before the model loads: a bad file fails fast
    enc = Encoder(args.model, args.layer)
    try:
        _check_topk(args.topk, enc.head.vocab_size)
        if old is not None:
            for key, want in (("model", enc.info.key), ("layer", enc.layer), ("topk", args.topk),
                              ("vocab_size", enc.head.vocab_size)):
                if old[key] != want:
                    raise OfflineError(f"--out: {args.out} was made with {key} {old[key]!r}, this run has {want!r}; "
                                       "write a new index (another --out) or match its settings")
        bad = enc.signatures(args.texts, "--texts", args.topk, args.max_length)
        ref = enc.signatures(args.reference, "--reference", args.topk, args.max_length) if args.reference else []
        vocab = enc.vocab()
    finally:
        enc.close()
    names = [rid for rid, _, _ in bad]
    ids, w = _pad(bad, args.topk)
    ref_ids, ref_w = _pad(ref, args.topk) if ref else (np.zeros((0, args.topk), np.int64), np.zeros((0, args.topk), np.float32))
    if old is not None:
        names = old["names"] + names
        ids, w = np.concatenate([old["ids"], ids]), np.concatenate([old["weights"], w])
        ref_ids, ref_w = np.concatenate([old["ref_ids"], ref_ids]), np.concatenate([old["ref_weights"], ref_w])
    V = enc.head.vocab_size
    unit = _unit(w)
    ref_best = (np.array([similarities((ref_ids[j], ref_w[j]), ids, unit, V).max() for j in range(len(ref_ids))])
                if len(ref_ids) else np.zeros(0))
    if args.threshold is not None:
        threshold, how = float(args.threshold), "fixed (--threshold)"
    elif len(ref_best):
        top = float(ref_best.max())
        threshold = top + args.margin * (1 - top)
        how = (f"{args.margin:g} of the way from the highest of {len(ref_best)} reference similarities ({top:.3f}) "
               "to 1")
    else:
        threshold, how = old["threshold"], "kept from the existing index (no --reference)"
    arrays = {
        "format": np.array(INDEX_FORMAT), "model": np.array(enc.info.key), "layer": np.array(enc.layer),
        "topk": np.array(args.topk), "vocab_size": np.array(V), "threshold": np.array(threshold),
        "ids": ids, "weights": w, "names": np.array(names, dtype=str),
        "ref_ids": ref_ids, "ref_weights": ref_w, "vocab": np.array(vocab, dtype=str),
    }
    try:
        save_npz(args.out, arrays)
    except OSError as exc:
        raise OfflineError(f"--out: cannot write {args.out!r}: {exc.strerror or exc}") from None
    self_sim = [similarities((ids[i], w[i]), ids, unit, V) for i in range(len(ids))]
    close = max((float(np.delete(s, i).max()) for i, s in enumerate(self_sim) if len(s) > 1), default=0.0)
    log(f"eigenwatch signatures add: wrote {args.out}: {len(ids)} signature(s) of {enc.info.key} at layer {enc.layer}, "
        f"top {args.topk} of {V} terms; threshold {threshold:.3f} ({how}); closest pair of entries {close:.3f}; "
        f"serve with `eigenwatch sidecar --signatures {args.out}` and the tap's EIGENWATCH_SIGNATURE_LAYER={enc.layer}")
    return 0


def _existing(path: str) -> dict | None:
    """The index at --out to add to, None when there is none."""
    if not os.path.exists(path):
        return None
    from eigenwatch.monitor.sidecar.signatures import SignatureIndex

    try:
        idx = SignatureIndex(path, "--out")
    except SignatureFileError as exc:
        raise OfflineError(f"{exc}; remove it or pick another --out") from None
    with np.load(path, allow_pickle=False) as z:
        raw = {k: z[k] for k in ("ids", "weights", "ref_ids", "ref_weights", "topk") if k in z.files}
    if "ref_ids" not in raw:
        raise OfflineError(f"--out: {path} lacks the reference signatures this version keeps; write a new index")
    return {"model": idx.model, "layer": idx.layer, "topk": int(raw.get("topk", raw["ids"].shape[1])),
            "vocab_size": idx.vocab_size, "names": idx.names, "ids": raw["ids"].astype(np.int64),
            "weights": raw["weights"].astype(np.float32), "ref_ids": raw["ref_ids"].astype(np.int64),
            "ref_weights": raw["ref_weights"].astype(np.float32), "threshold": idx.threshold}


# --------------------------------------------------------------------------- head, encode


def head(args) -> int:
    enc = Encoder(args.model, None)
    try:
        exported, vocab = enc.head.export(), enc.vocab()
    finally:
        enc.close()
    try:
        save_head(args.out, exported, vocab, enc.info.key)
    except OSError as exc:
        raise OfflineError(f"--out: cannot write {args.out!r}: {exc.strerror or exc}") from None
    v, d = exported["weight"].shape
    log(f"eigenwatch signatures head: wrote {args.out}: {enc.info.key}'s {exported['source']} [{v} x {d}], "
        f"final norm {exported['norm']}; serve with `eigenwatch sidecar --sparse-head {args.out}`")
    return 0


def encode(args) -> int:
    enc = Encoder(args.model, args.layer)
    try:
        _check_topk(args.topk, enc.head.vocab_size)
        sigs = enc.signatures(args.texts, "--texts", args.topk, args.max_length)
        vocab = enc.vocab()
    finally:
        enc.close()
    lines = [json.dumps({"id": rid, "layer": enc.layer,
                         "terms": [[vocab[i], int(i), round(float(x), 6)] for i, x in zip(ids, w)]})
             for rid, ids, w in sigs]
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text, end="")
    else:
        try:
            with open(args.out, "w") as f:
                f.write(text)
        except OSError as exc:
            raise OfflineError(f"--out: cannot write {args.out!r}: {exc.strerror or exc}") from None
    log(f"eigenwatch signatures encode: {len(sigs)} text(s) at layer {enc.layer}")
    return 0
