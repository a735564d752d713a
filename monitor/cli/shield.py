"""`eigenwatch shield fit | eval`: fit an EigenShield file from reference embeddings
(an .npy, or texts through a model) and print a shield's attack table on labelled data.

    eigenwatch shield fit --embeddings ref.npy --out shield.npz
    eigenwatch shield fit --model minilm --texts ref.jsonl --out shield.npz
    eigenwatch shield eval --shield shield.npz --embeddings x.npy --labels y.npy
    eigenwatch shield eval --shield shield.npz --model minilm --texts 0=a.jsonl --texts 1=b.jsonl

Errors raise OfflineError (main.py prints it and exits 2). torch loads only for --texts.
"""

from __future__ import annotations

import math

import numpy as np

from eigenwatch.kernels import shield as S
from eigenwatch.monitor.offline import OfflineError, log, positive_int

# ShieldConfig field -> the flag that sets it (its errors name the field)
_FLAGS = {"sigma2": "--sigma2", "alpha": "--alpha", "quantile": "--rbns-quantile", "max_rbns": "--max-rbns",
          "splits": "--splits", "null_dirs": "--null-dirs", "noise": "--noise", "seed": "--seed"}


def _model_args(p) -> None:
    from eigenwatch.monitor.offline.engines import ENGINES

    p.add_argument("--model", default=None, help="with --texts: model directory, or 'minilm' / 'tiny'")
    p.add_argument("--engine", default="hf", choices=ENGINES,
                   help="with --texts: hf (transformers, default) or vllm, the same tap either way")
    p.add_argument("--layer", type=int, default=-1,
                   help="with --texts: the layer whose hidden states are mean-pooled (default -1: the last)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="with --texts: truncate texts to this many tokens (default: the model's max positions)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="with --texts: keep the pooled rows as they are (default: L2-normalise each, as "
                        "sentence-transformers does)")


def add_args(p) -> None:
    sub = p.add_subparsers(dest="shield_command", required=True, metavar="{fit,eval}")
    d = S.ShieldConfig()
    f = sub.add_parser("fit", help="fit a shield file from reference embeddings (.npy) or texts (JSONL + --model)")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", metavar="X.npy", help="clean reference rows [N, d], N >= 4")
    src.add_argument("--texts", metavar="REF.jsonl", help="clean reference texts, one {\"id\", \"text\"} per line "
                                                         "(needs --model)")
    _model_args(f)
    f.add_argument("--out", required=True, metavar="SHIELD.npz",
                   help="shield file to write, atomically (the sidecar's --shield reloads it)")
    f.add_argument("--calib-fraction", type=float, default=0.2,
                   help="share of the rows held out, in [0, 1), whose scores set the sidecar's verdict threshold "
                        "(split conformal); 0 fits on all rows and uses their own, slightly low, scores "
                        "(default %(default)s)")
    f.add_argument("--sigma2", choices=S.SIGMA2_METHODS, default=d.sigma2,
                   help="robust noise level: median (Gavish-Donoho) or mppca (default %(default)s)")
    f.add_argument("--alpha", default=str(d.alpha),
                   help="Tracy-Widom false-alarm level of the spike edge, in (0, 1), or 'none' for the plain MP "
                        "edge (default %(default)s)")
    f.add_argument("--rbns-quantile", type=float, default=d.quantile,
                   help="keep a spike when its RbNS is <= this quantile of the null directions' RbNS, in [0, 1] "
                        "(default %(default)s)")
    f.add_argument("--max-rbns", type=float, default=d.max_rbns,
                   help="... and <= this, in (0, 2] (default %(default)s)")
    f.add_argument("--splits", type=int, default=d.splits, help="random half-splits for RbNS (default %(default)s)")
    f.add_argument("--null-dirs", type=int, default=d.null_dirs,
                   help="directions below the edge that form the RbNS null (default %(default)s)")
    f.add_argument("--noise", type=float, default=d.noise,
                   help="extra noise added to each half, variance in units of sigma2, >= 0 (default %(default)s)")
    f.add_argument("--seed", type=int, default=d.seed, help="seed of the splits and the held-out rows (default %(default)s)")

    e = sub.add_parser("eval", help="the attack table of a shield on labelled embeddings or texts")
    e.add_argument("--shield", required=True, metavar="SHIELD.npz", help="a file from `eigenwatch shield fit`")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", metavar="X.npy", help="labelled rows [N, d] (needs --labels)")
    src.add_argument("--texts", metavar="LABEL=TEXTS.jsonl", action="append",
                     help="texts of one class, LABEL 0 or 1; give it once per class (needs --model)")
    e.add_argument("--labels", metavar="Y.npy", help="with --embeddings: one label per row, 0 or 1")
    _model_args(e)
    e.add_argument("--eps", default="0.1,0.2", help="L2 attack budgets, comma-separated, > 0 (default %(default)s)")
    e.add_argument("--verdict-quantile", type=float, default=0.99,
                   help="the sidecar's --shield-quantile to report verdicts at, in (0, 1) (default %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="seed of the probe's train/test split (default %(default)s)")


def run(args) -> int:
    return fit(args) if args.shield_command == "fit" else evaluate(args)


# --------------------------------------------------------------------------- fit


def _config(args) -> S.ShieldConfig:
    if args.alpha.strip().lower() == "none":
        alpha = None
    else:
        try:
            alpha = float(args.alpha)
        except ValueError:
            raise OfflineError(f"--alpha: expected a level in (0, 1) or 'none', got {args.alpha!r}") from None
    try:
        return S.ShieldConfig(sigma2=args.sigma2, alpha=alpha, quantile=args.rbns_quantile, max_rbns=args.max_rbns,
                              splits=args.splits, null_dirs=args.null_dirs, noise=args.noise, seed=args.seed)
    except ValueError as exc:
        field, _, rest = str(exc).partition(":")
        raise OfflineError(f"{_FLAGS.get(field, field)}:{rest}") from None


def _rows(args) -> tuple[np.ndarray, str]:
    """(x [N, d] float64, which flag they came from) for fit."""
    from eigenwatch.monitor.offline.embed import embed_texts, load_rows, read_texts

    if args.embeddings:
        return load_rows(args.embeddings, "--embeddings"), "--embeddings"
    if not args.model:
        raise OfflineError("--texts: needs --model (a model directory, or 'minilm' / 'tiny') to embed them")
    items = read_texts(args.texts, "--texts")  # before the model loads: bad lines fail fast
    _, x, _ = embed_texts(args.model, items, args.engine, args.layer, args.max_length, args.normalize, "shield: embed")
    return x, "--texts"


def fit(args) -> int:
    from eigenwatch.monitor.offline import check_out

    check_out(args.out, example="shield.npz")  # before the fit, not after it
    cfg = _config(args)
    if not 0 <= args.calib_fraction < 1:
        raise OfflineError(f"--calib-fraction: expected a number in [0, 1), got {args.calib_fraction}")
    x, source = _rows(args)
    n = x.shape[0]
    held = int(round(n * args.calib_fraction))
    if args.calib_fraction > 0:
        held = max(held, 1)
        if n - held < 4:
            raise OfflineError(f"{source}: {n} rows leave {n - held} to fit after --calib-fraction "
                               f"{args.calib_fraction} holds {held} out; a fit needs >= 4: use more rows or "
                               "--calib-fraction 0")
    order = np.random.default_rng(args.seed).permutation(n)
    cal_idx, fit_idx = np.sort(order[:held]), np.sort(order[held:])  # rows keep their file order
    try:
        shield = S.fit(x[fit_idx], cfg)
    except ValueError as exc:
        raise OfflineError(f"{source}: {exc}") from None
    if held:
        shield = S.calibrate(shield, x[cal_idx])
    try:
        S.save(shield, args.out)
    except OSError as exc:
        raise OfflineError(f"--out: cannot write {args.out!r}: {exc.strerror or exc}") from None
    t99 = S.score_threshold(shield, 0.99)
    log(f"eigenwatch shield fit: wrote {args.out}: dim {shield.dim}, {shield.spike_vectors.shape[1]} spike(s) above "
        f"the edge {shield.edge:.4g} (sigma2 {shield.sigma2:.4g}), {shield.rank} kept; fitted on {len(fit_idx)} "
        f"row(s) (data sha256 {shield.data_sha256[:12]}), "
        + (f"calibrated on {held} held-out row(s)" if held else "calibrated on its own rows (in-sample)")
        + f"; score threshold at 0.99: {t99:.4g}"
        + (" (too few calibration rows to reject at 0.99: it takes >= 99)" if math.isinf(t99) else ""))
    return 0


# --------------------------------------------------------------------------- eval


def _eps(text: str) -> tuple[float, ...]:
    try:
        eps = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        eps = ()
    if not eps or not all(math.isfinite(e) and e > 0 for e in eps):
        raise OfflineError(f"--eps: expected comma-separated budgets > 0, e.g. 0.1,0.2; got {text!r}")
    return eps


def _labelled(args, dim: int) -> tuple[np.ndarray, np.ndarray]:
    from eigenwatch.monitor.offline.embed import embed_texts, load_labels, load_rows, read_texts

    if args.embeddings:
        if not args.labels:
            raise OfflineError("--embeddings: needs --labels Y.npy (one 0/1 label per row)")
        x = load_rows(args.embeddings, "--embeddings", dim)
        return x, load_labels(args.labels, x.shape[0])
    if not args.model:
        raise OfflineError("--texts: needs --model (a model directory, or 'minilm' / 'tiny') to embed them")
    files = {}
    for spec in args.texts:
        label, sep, path = spec.partition("=")
        if not sep or label not in ("0", "1") or not path:
            raise OfflineError(f"--texts: expected LABEL=TEXTS.jsonl with LABEL 0 or 1, got {spec!r}")
        if int(label) in files:
            raise OfflineError(f"--texts: label {label} given twice ({files[int(label)]} and {path})")
        files[int(label)] = path
    if set(files) != {0, 1}:
        raise OfflineError(f"--texts: give both classes, --texts 0=A.jsonl --texts 1=B.jsonl (got only {sorted(files)})")
    items, labels = [], []
    for label, path in sorted(files.items()):
        got = read_texts(path, "--texts")
        items += [(f"{label}:{rid}", text) for rid, text in got]  # ids unique across the two files
        labels += [label] * len(got)
    ids, x, _ = embed_texts(args.model, items, args.engine, args.layer, args.max_length, args.normalize,
                            "shield: embed")
    label_of = dict(zip((rid for rid, _ in items), labels))
    if x.shape[1] != dim:
        raise OfflineError(f"--model: {args.model} gives rows of dim {x.shape[1]}, but the shield (--shield) takes {dim}")
    return x, np.array([label_of[r] for r in ids], dtype=np.int64)


def evaluate(args) -> int:
    from eigenwatch.monitor.offline.attacks import Linear, evaluate as attack, fit_probe, header, row, stratified_split

    eps = _eps(args.eps)
    if not 0 < args.verdict_quantile < 1:
        raise OfflineError(f"--verdict-quantile: expected a probability in (0, 1), got {args.verdict_quantile}")
    try:
        shield = S.load(args.shield)
    except FileNotFoundError:
        raise OfflineError(f"--shield: no such file {args.shield!r}") from None
    except S.ShieldFileError as exc:
        raise OfflineError(f"--shield: {exc}") from None
    x, y = _labelled(args, shield.dim)
    counts = np.bincount(y, minlength=2)
    if counts.min() < 4:
        raise OfflineError(f"labels: each class needs >= 4 rows (half train the probe, half test it); "
                           f"got {counts[0]} of class 0 and {counts[1]} of class 1")
    tr, va, te = stratified_split(y, args.seed)
    te = np.sort(np.concatenate([va, te]))  # eval selects nothing: the probe's half and the test half
    probe = fit_probe(x[tr], y[tr])
    none, es = Linear("no defence"), Linear("shield", shield=shield)
    print(f"shield {args.shield}: dim {shield.dim}, {shield.rank} of {shield.spike_vectors.shape[1]} spike "
          f"direction(s) kept, data sha256 {shield.data_sha256[:12]}")
    print(f"probe: logistic regression (C=1) on {len(tr)} raw rows; test: {len(te)} rows "
          f"({np.sum(y[te] == 0)} of class 0, {np.sum(y[te] == 1)} of class 1); ASR relative to no defence in ()")
    print("(a): along the probe's weight, unaware of the shield; (b): the worst L2 perturbation through it")
    print(header(eps))
    base = attack(probe, none, x[te], y[te], eps)
    print(row("no defence", base, None, eps))
    print(row(f"shield (k={shield.rank})", attack(probe, es, x[te], y[te], eps), base, eps))
    retrained = fit_probe(shield.project(x[tr]).y, y[tr])
    print(row("shield + probe retrained on shielded rows", attack(retrained, es, x[te], y[te], eps), base, eps))
    if shield.calib_scores.size == 0:
        print("verdicts: the shield carries no calibration scores (a version-1 file): refit it to get them")
        return 0
    # What the sidecar's verdict sees: the energy outside the subspace, before and after attack.
    q = args.verdict_quantile
    th = S.score_threshold(shield, q)
    t = (2 * y[te] - 1)[:, None]
    w = probe["w"]
    pw = es.direction(w)
    rates = [f"clean {np.mean(shield.project(x[te]).score > th):.1%}"]
    for e in eps:
        a = x[te] - e * t * w / np.linalg.norm(w)
        b = x[te] - e * t * pw / max(float(np.linalg.norm(pw)), 1e-300)
        rates.append(f"(a)@{e:g} {np.mean(shield.project(a).score > th):.1%}, "
                     f"(b)@{e:g} {np.mean(shield.project(b).score > th):.1%}")
    note = (f" ({shield.calib_scores.size} calibration scores are too few to reject anything at {q:g})"
            if math.isinf(th) else "")
    print(f"verdicts at --shield-quantile {q:g} (score threshold {th:.4g}{note}): rows rejected: " + "; ".join(rates))
    return 0
