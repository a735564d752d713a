"""Detector quality, side by side: AUROC per detector per shift, and the
calibrated false-alarm rate on held-out in-distribution texts.

Runs the public contract exactly as a user would: `eigenwatch calibrate` on
the reference texts, `eigenwatch score` on held-out + shifted texts (the
evaluation sets of bench/detect_data.py, built from text on this machine),
then reads SCORES.jsonl. Nothing here is fitted on the shifts: calibrate only
sees in-distribution text (its GRU and token probe learn from its own corruption
recipe, monitor/offline/texts.py, which is none of the shifts).

    .venv/bin/python bench/bench_detect.py                     # minilm and tiny, HF engine
    .venv/bin/python bench/bench_detect.py --models minilm --engine vllm
    .venv/bin/python bench/bench_detect.py --report out/       # also `eigenwatch report` HTML per model
    .venv/bin/python bench/bench_detect.py --far-seeds 5       # false-alarm rate over 5 calibration splits
    .venv/bin/python bench/bench_detect.py --keep work/        # keep texts, CALIB.json and SCORES.jsonl
    .venv/bin/python bench/bench_detect.py --bound             # what re-weighting the combination could buy
    .venv/bin/python bench/bench_detect.py --throughput --models minilm   # `score` against the bare forward
    .venv/bin/python bench/bench_detect.py --transfer --models minilm     # corpora A/B/C × sentences/paragraphs
    .venv/bin/python bench/bench_detect.py --transfer --corpora C --models minilm   # only the never-tuned corpus
    .venv/bin/python bench/bench_detect.py --transfer --quick --models minilm   # the same, a few minutes
    .venv/bin/python bench/bench_detect.py --transfer --bound --models minilm   # + what re-weighting could buy

--transfer measures transfer, not tuning: three in-distribution corpora (A:
CPython's docs, what the project was tuned on; B: English man pages, looked at
when the rule of session 12 was chosen; C: Debian package descriptions, never
tuned on), each cut into single sentences (8–20 words) and paragraphs (40–90
words), shifts made in bench/detect_data.py (word_shuffle and content_swap
keep the corpus's vocabulary). It prints, per corpus and regime, AUROC per
detector per shift, the combined score, the best baseline and the mean over
the vocabulary-preserving shifts; then picks a combination rule (which
detectors' p-values to combine) on each corpus and reports it on the others.

"baselines" are the anchors users compare against: LLM-Check's hidden score
and the Mahalanobis distance of mean-pooled hidden states.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detect_data  # noqa: E402

from eigenwatch.monitor.combined import Combined, auroc  # noqa: E402

BASELINES = ("hidden_mahalanobis", "llmcheck_hidden")
EIGENWATCH = sys.executable.replace("python", "eigenwatch") if Path(
    sys.executable.replace("python", "eigenwatch")).exists() else "eigenwatch"


def run(*args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([EIGENWATCH, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"eigenwatch {args[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    for line in r.stderr.splitlines():
        if line.startswith("eigenwatch calibrate: EigenTrack") or line.startswith("eigenwatch score: wrote"):
            print("   ", line)
    return time.perf_counter() - t0


def weight_bound(cal_scores: dict, neg: list[dict], by: dict, draws: int = 2000, seed: int = 0,
                 shifts=None, min_vocab: float | None = None) -> dict | None:
    """The best any fixed weighting of every detector's conformal p-value could
    do against the best baseline, with the weights chosen on these very shifts.

    Statistic log Σ_j w_j / p_j (the combined score's harmonic mean, weighted);
    w over each detector alone, all equal, and `draws` Dirichlet(½) draws. The
    answer is the largest worst-shift margin (combined − best baseline) any of
    them reaches, and that weighting's mean margin. It is an upper bound on
    what re-weighting the combination could buy, not a detector: it has seen
    the shifts. shifts: which of `by` (default detect_data.SHIFTS); min_vocab:
    only weightings whose mean AUROC over the vocabulary-keeping shifts reaches
    it count (None when none does).
    """
    comb = Combined().fit({k: np.asarray(v, dtype=np.float64) for k, v in cal_scores.items()})
    names = comb.names

    def matrix(rows):
        return comb.transform({k: np.array([r["detectors"][k] for r in rows]) for k in names})  # [m, k] −log p

    U_neg = matrix(neg)
    names_of = list(detect_data.SHIFTS if shifts is None else shifts)
    shifts = [(matrix(by[s]), max(auroc([r["detectors"][b] for r in neg], [r["detectors"][b] for r in by[s]])
                                    for b in BASELINES)) for s in names_of]
    kept = [i for i, s in enumerate(names_of) if s in detect_data.VOCAB_KEPT]
    rng = np.random.default_rng(seed)
    W = np.vstack([np.eye(len(names)), np.full(len(names), 1.0 / len(names)),
                   rng.dirichlet(np.full(len(names), 0.5), size=draws)])
    best = None
    for w in W:
        logw = np.log(np.maximum(w, 1e-300))

        def stat(U):
            Z = U + logw
            top = Z.max(axis=1, keepdims=True)
            return (top + np.log(np.exp(Z - top).sum(axis=1, keepdims=True)))[:, 0]

        t_neg = stat(U_neg)
        aucs = np.array([auroc(t_neg, stat(U)) for U, _ in shifts])
        margins = aucs - np.array([base for _, base in shifts])
        vocab = float(aucs[kept].mean()) if kept else float("nan")
        if min_vocab is not None and not vocab >= min_vocab:
            continue
        if best is None or margins.min() > best["worst"]:
            best = {"worst": float(margins.min()), "mean": float(margins.mean()),
                    "margins": dict(zip(names_of, margins.tolist())), "mean_vocab_kept": vocab,
                    "weights": {k: float(x) for k, x in zip(names, w)}}
    return best


def evaluate(model: str, engine: str, files: dict, work: Path, far: list[float], report: Path | None,
             far_seeds: int = 1, bound: bool = False) -> dict:
    calib = work / f"{model}.calib.json"
    print(f"\n== {model} ({engine} engine) ==")
    t_cal = run("calibrate", "--model", model, "--engine", engine, "--texts", files["reference"],
                "--out", str(calib), "--far", ",".join(map(str, far)))
    evals = work / "eval_all.jsonl"
    with evals.open("w") as out:
        for name in ("heldout", *detect_data.SHIFTS):
            out.write(Path(files[name]).read_text())
    scores = work / f"{model}.scores.jsonl"
    t_score = run("score", "--model", model, "--engine", engine, "--calibration", str(calib),
                  "--texts", str(evals), "--out", str(scores))
    rows = [json.loads(l) for l in scores.read_text().splitlines()]
    by = defaultdict(list)
    for r in rows:
        by[r["id"].rsplit("-", 1)[0]].append(r)
    neg = by.pop("heldout")
    dets = sorted(neg[0]["detectors"])
    cols = dets + ["combined"]

    def values(rs, k):
        return np.array([r["score"] if k == "combined" else r["detectors"][k] for r in rs])

    table = {s: {k: auroc(values(neg, k), values(by[s], k)) for k in cols} for s in detect_data.SHIFTS}
    width = max(len(c) for c in cols) + 1
    print(f"   calibrate {t_cal:.0f} s, score {len(rows)} texts {t_score:.0f} s")
    print(f"   AUROC vs {len(neg)} held-out in-distribution texts ({len(by[detect_data.SHIFTS[0]])} per shift; "
          "* = hard: vocabulary kept)")
    print("   " + "shift".ljust(14) + "".join(c.rjust(width) for c in cols) + "  best-baseline  combined-best")
    diffs, diffs_all = [], []
    for s in detect_data.SHIFTS:
        row = table[s]
        best_base = max(row[b] for b in BASELINES if b in row)
        best_all = max(row[d] for d in dets)
        diffs.append(row["combined"] - best_base)
        diffs_all.append(row["combined"] - best_all)
        mark = "*" if s in detect_data.HARD else " "
        print("   " + f"{s}{mark}".ljust(14) + "".join(f"{row[c]:.3f}".rjust(width) for c in cols)
              + f"  {best_base:13.3f}  {row['combined'] - best_base:+13.3f}")
    mean = {c: float(np.mean([table[s][c] for s in detect_data.SHIFTS])) for c in cols}
    print("   " + "mean".ljust(14) + "".join(f"{mean[c]:.3f}".rjust(width) for c in cols))
    print(f"   combined − best baseline: mean {np.mean(diffs):+.3f}, worst {np.min(diffs):+.3f} "
          f"({detect_data.SHIFTS[int(np.argmin(diffs))]}); combined ≥ best baseline on "
          f"{sum(d >= 0 for d in diffs)}/{len(diffs)} shifts")
    print(f"   combined − best single detector: mean {np.mean(diffs_all):+.3f}, worst {np.min(diffs_all):+.3f}")
    voters = json.loads(calib.read_text())["offline"]["combined"]["calibration_scores"]
    print(f"   combined score made of: {', '.join(sorted(voters))}")
    wb = None
    if bound:
        wb = weight_bound(json.loads(calib.read_text())["offline"]["calibration_scores"], neg, by)
        print(f"   bound: the best fixed weighting of all {len(wb['weights'])} detectors' p-values, chosen on these "
              f"shifts, reaches worst {wb['worst']:+.3f} (mean {wb['mean']:+.3f}) against the best baseline; weights "
              + ", ".join(f"{k} {v:.2f}" for k, v in wb["weights"].items() if v >= 0.005))
    p = np.array([r["p_value"] for r in neg])
    fars = {f: float((p < f).mean()) for f in far}
    n_cal = json.loads(calib.read_text())["offline"]["n_calibration"]
    # Two sources of spread: the held-out sample (binomial) and the calibration
    # split itself (the conformal threshold is a random order statistic of n_cal
    # scores: the realised rate is Beta-distributed with variance ≈ f(1 − f)/(n_cal + 2)).
    sd = {f: float(np.sqrt(f * (1 - f) / len(p) + f * (1 - f) / (n_cal + 2))) for f in far}
    print("   false-alarm rate on held-out in-distribution texts: " + ", ".join(
        f"configured {f:.0%} -> measured {fars[f]:.1%} (expected spread s.d. {sd[f]:.1%})" for f in far))
    far_runs = [fars]
    for seed in range(1, far_seeds):  # other calibration splits (and GRU seeds): the rate a user can expect
        c2 = work / f"{model}.calib.seed{seed}.json"
        run("calibrate", "--model", model, "--engine", engine, "--texts", files["reference"], "--out", str(c2),
            "--far", ",".join(map(str, far)), "--seed", str(seed))
        s2 = work / f"{model}.heldout.seed{seed}.jsonl"
        run("score", "--model", model, "--engine", engine, "--calibration", str(c2), "--texts", files["heldout"],
            "--out", str(s2))
        p2 = np.array([json.loads(l)["p_value"] for l in s2.read_text().splitlines()])
        far_runs.append({f: float((p2 < f).mean()) for f in far})
    if far_seeds > 1:
        print(f"   over {far_seeds} calibration seeds: " + ", ".join(
            f"configured {f:.0%} -> mean {np.mean([r[f] for r in far_runs]):.1%} "
            f"(per seed {' '.join(f'{r[f]:.1%}' for r in far_runs)})" for f in far))
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        shift_files = []
        for s in detect_data.SHIFTS:
            path = work / f"{model}.{s}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in by[s]))
            shift_files.append(str(path))
        ref = work / f"{model}.heldout.jsonl"
        ref.write_text("".join(json.dumps(r) + "\n" for r in neg))
        html = report / f"{model}.html"
        subprocess.run([EIGENWATCH, "report", *shift_files, "--reference", str(ref), "--out", str(html),
                        "--title", f"eigenwatch detectors on {model}"], check=True, capture_output=True)
        print(f"   report: {html}")
    return {"auroc": table, "mean": mean, "far": fars, "far_by_seed": far_runs, "n_heldout": len(neg),
            "n_calibration": n_cal, "combined_voters": sorted(voters), "weight_bound": wb}


def calibrate_and_score(model: str, engine: str, files: dict, shifts, work: Path, tag: str,
                        far: list[float]) -> dict:
    """`eigenwatch calibrate` on files["reference"], `eigenwatch score` on heldout + shifts:
    {"neg": held-out rows, "by": {shift: rows}, "cal": the calibration's offline section}."""
    calib = work / f"{model}.{tag}.calib.json"
    t_cal = run("calibrate", "--model", model, "--engine", engine, "--texts", files["reference"],
                "--out", str(calib), "--far", ",".join(map(str, far)))
    evals = work / f"{tag}.eval.jsonl"
    with evals.open("w") as out:
        for name in ("heldout", *shifts):
            out.write(Path(files[name]).read_text())
    scores = work / f"{model}.{tag}.scores.jsonl"
    t_score = run("score", "--model", model, "--engine", engine, "--calibration", str(calib),
                  "--texts", str(evals), "--out", str(scores))
    by = defaultdict(list)
    for line in scores.read_text().splitlines():
        r = json.loads(line)
        by[r["id"].rsplit("-", 1)[0]].append(r)
    print(f"    {tag}: calibrate {t_cal:.0f} s, score {sum(map(len, by.values()))} texts {t_score:.0f} s")
    return {"neg": by.pop("heldout"), "by": dict(by), "cal": json.loads(calib.read_text())["offline"]}


def rule_scores(rule: dict | None, res: dict) -> tuple[np.ndarray, dict]:
    """A combination rule applied to one corpus's run: (held-out scores, {shift: scores}).
    rule None: the combined score `calibrate` wrote. Else {"detectors": [...], "weights": [...]}:
    the harmonic-mean p-value of those detectors, made conformal on this corpus's own
    calibration scores (so only the choice of detectors and weights transfers, never a threshold)."""
    if rule is None:
        return (np.array([r["score"] for r in res["neg"]]),
                {s: np.array([r["score"] for r in rows]) for s, rows in res["by"].items()})
    cal = res["cal"]["calibration_scores"]
    comb = Combined().fit({k: np.asarray(cal[k], dtype=np.float64) for k in rule["detectors"]},
                          weights=dict(zip(rule["detectors"], rule["weights"])))

    def sc(rows):
        return comb.score({k: np.array([r["detectors"][k] for r in rows]) for k in rule["detectors"]})

    return sc(res["neg"]), {s: sc(rows) for s, rows in res["by"].items()}


def check_slack(aucs: dict, base: dict) -> float:
    """The issue's check as one number: min(worst margin against the best baseline, mean AUROC over
    the vocabulary-preserving shifts − 0.90); >= 0 means the check holds."""
    worst = min(aucs[s] - base[s] for s in aucs)
    vp = float(np.mean([aucs[s] for s in detect_data.VOCAB_KEPT]))
    return min(worst, vp - 0.90)


def rule_aucs(rule, res) -> dict:
    neg, by = rule_scores(rule, res)
    return {s: auroc(neg, v) for s, v in by.items()}


def baseline_aucs(res) -> dict:
    neg, by = res["neg"], res["by"]
    return {s: max(auroc([r["detectors"][b] for r in neg], [r["detectors"][b] for r in by[s]]) for b in BASELINES)
            for s in by}


def candidate_rules(dets: list[str]) -> list[dict]:
    """Every non-empty subset of the detectors, equally weighted (2^k − 1 rules)."""
    out = []
    for mask in range(1, 2 ** len(dets)):
        pick = [d for i, d in enumerate(dets) if mask >> i & 1]
        out.append({"detectors": pick, "weights": [1.0] * len(pick)})
    return out


def pick_rule(runs: dict, dets: list[str]) -> tuple[dict, float]:
    """The rule with the largest check slack, worst over the regimes of one corpus
    (runs: {regime: calibrate_and_score result}); ties: fewer detectors."""
    base = {g: baseline_aucs(res) for g, res in runs.items()}
    best, best_slack = None, -np.inf
    for rule in candidate_rules(dets):
        slack = min(check_slack(rule_aucs(rule, res), base[g]) for g, res in runs.items())
        if slack > best_slack + 1e-12:
            best, best_slack = rule, slack
    return best, float(best_slack)


def print_transfer_table(title: str, res: dict, extra: dict[str, dict]) -> dict:
    """AUROC per detector per shift, the combined score, extra rule columns, the best baseline;
    then the mean over every shift and over the vocabulary-preserving ones."""
    neg, by = res["neg"], res["by"]
    shifts = [s for s in detect_data.TRANSFER_SHIFTS if s in by]
    dets = sorted(neg[0]["detectors"])
    table = {s: {k: auroc([r["detectors"][k] for r in neg], [r["detectors"][k] for r in by[s]]) for k in dets}
             for s in shifts}
    comb = rule_aucs(None, res)
    base = baseline_aucs(res)
    for s in shifts:
        table[s]["combined"] = comb[s]
        table[s]["best_baseline"] = base[s]
        for name, aucs in extra.items():
            table[s][name] = aucs[s]
    cols = dets + ["combined", *extra, "best_baseline"]
    short = {c: c.replace("_mahalanobis", "_maha").replace("llmcheck_hidden", "llmcheck")
             .replace("spectral_spike", "spike") for c in cols}
    width = max(8, max(len(v) for v in short.values()) + 1)
    print(f"\n   {title}: AUROC vs {len(neg)} held-out texts, {len(by[shifts[0]])} per shift (* = vocabulary kept)")
    print("   " + "shift".ljust(14) + "".join(short[c].rjust(width) for c in cols))
    for s in shifts:
        mark = "*" if s in detect_data.VOCAB_KEPT else " "
        print("   " + f"{s}{mark}".ljust(14) + "".join(f"{table[s][c]:.3f}".rjust(width) for c in cols))
    mean = {c: float(np.mean([table[s][c] for s in shifts])) for c in cols}
    vp = {c: float(np.mean([table[s][c] for s in detect_data.VOCAB_KEPT])) for c in cols}
    print("   " + "mean".ljust(14) + "".join(f"{mean[c]:.3f}".rjust(width) for c in cols))
    print("   " + "mean vocab*".ljust(14) + "".join(f"{vp[c]:.3f}".rjust(width) for c in cols))
    for name in ("combined", *extra):
        margins = {s: table[s][name] - base[s] for s in shifts}
        worst = min(margins, key=margins.get)
        ok = margins[worst] >= 0 and vp[name] >= 0.90
        print(f"   check [{name}]: ≥ best baseline on {sum(m >= 0 for m in margins.values())}/{len(shifts)} shifts "
              f"(worst {margins[worst]:+.3f}, {worst}); mean over vocabulary-kept shifts {vp[name]:.3f} "
              f"-> {'PASS' if ok else 'FAIL'}")
    return {"auroc": table, "mean": mean, "mean_vocab_kept": vp}


def transfer(model: str, engine: str, work: Path, far: list[float], seed: int, quick: bool,
             bound: bool = False, corpora: tuple[str, ...] = detect_data.CORPORA) -> dict:
    """The corpora × both regimes: calibrate + score each, print the tables; then pick a
    combination rule on each corpus (both regimes) and report it on the others."""
    sizes = dict(n_ref=150, n_eval=150, n_shift=50) if quick else dict(n_ref=300, n_eval=350, n_shift=100)
    print(f"\n== {model} ({engine} engine): transfer, corpora {'/'.join(corpora)} × "
          f"{'/'.join(detect_data.REGIMES)}, {sizes} ==")
    runs: dict[str, dict[str, dict]] = {c: {} for c in corpora}
    for regime in detect_data.REGIMES:
        for corpus in corpora:
            files = detect_data.build_transfer(work / "data", corpus, regime, seed, **sizes)
            runs[corpus][regime] = calibrate_and_score(model, engine, files, detect_data.TRANSFER_SHIFTS, work,
                                                       f"{corpus}-{regime}", far)
    dets = sorted(runs[corpora[0]][detect_data.REGIMES[0]]["neg"][0]["detectors"])
    rules = {}
    for corpus in corpora:
        rule, slack = pick_rule(runs[corpus], dets)
        rules[corpus] = rule
        print(f"   rule picked on corpus {corpus} (both regimes, check slack there {slack:+.3f}): harmonic mean of "
              + ", ".join(rule["detectors"]))
    out = {"rules": rules, "tables": {}}
    for regime in detect_data.REGIMES:
        for corpus in corpora:
            others = [c for c in corpora if c != corpus]
            res = runs[corpus][regime]
            extra = {f"rule_{o}": rule_aucs(rules[o], res) for o in others}
            picked = "; ".join(f"rule_{o}: picked on corpus {o}" for o in others)
            out["tables"][f"{corpus}-{regime}"] = print_transfer_table(
                f"corpus {corpus}, {regime}s" + (f" ({picked})" if others else ""), res, extra)
            if bound:
                wb = weight_bound(res["cal"]["calibration_scores"], res["neg"], res["by"],
                                  shifts=[s for s in detect_data.TRANSFER_SHIFTS if s in res["by"]], min_vocab=0.90,
                                  draws=3000)
                out["tables"][f"{corpus}-{regime}"]["weight_bound"] = wb
                if wb is None:
                    print("   bound: no fixed weighting of the detectors' p-values reaches 0.90 on the "
                          "vocabulary-kept shifts")
                else:
                    worst = min(wb["margins"], key=wb["margins"].get)
                    print(f"   bound: the best fixed weighting of all {len(wb['weights'])} detectors' p-values with a "
                          f"vocabulary-kept mean >= 0.90 ({wb['mean_vocab_kept']:.3f}), chosen on these very shifts: "
                          f"worst margin {wb['worst']:+.3f} ({worst}); weights "
                          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(wb["weights"].items(), key=lambda kv: -kv[1])
                                      if v >= 0.01))
    return out


def bare_forward(model: str, texts: list[str], batch: int) -> float:
    """texts/s of the bare transformers forward with hidden states (the model's own
    floor for `score`): texts sorted by length, `batch` per padded forward, as
    `score` batches them; tokenised up front, load not counted."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from eigenwatch.monitor.offline.engines import model_info

    info = model_info(model)
    cls = AutoModel if info.runner == "pooling" else AutoModelForCausalLM
    net = cls.from_pretrained(info.path, dtype=torch.float32).eval()
    ids = sorted((info.tokenizer(t, truncation=True, max_length=info.max_positions)["input_ids"] for t in texts),
                 key=len)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for at in range(0, len(ids), batch):
            part = ids[at: at + batch]
            x = torch.zeros((len(part), max(map(len, part))), dtype=torch.long)
            mask = torch.zeros_like(x)
            for b, tok in enumerate(part):
                x[b, : len(tok)] = torch.tensor(tok)
                mask[b, : len(tok)] = 1
            net(input_ids=x, attention_mask=mask, output_hidden_states=True)
    return len(ids) / (time.perf_counter() - t0)


def score_rate(model: str, calib: Path, texts: Path, out: Path, batch: int) -> float:
    """texts/s `eigenwatch score` reports for itself (model load not counted)."""
    r = subprocess.run([EIGENWATCH, "score", "--model", model, "--calibration", str(calib), "--texts", str(texts),
                        "--out", str(out), "--batch-size", str(batch)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"eigenwatch score failed ({r.returncode}):\n{r.stderr[-3000:]}")
    for line in r.stderr.splitlines():
        if "texts/s" in line and line.startswith("eigenwatch score:"):
            return float(line.split(" s, ", 1)[1].split(" texts/s")[0])
    sys.exit("eigenwatch score printed no throughput line")


def throughput(model: str, files: dict, work: Path, rounds: int = 3) -> dict:
    """`score` texts/s at batch 32 and at batch 1 against the bare forward at batch 32 and 1,
    interleaved over `rounds` rounds (medians); and how far the batched scores are from the
    one-text-per-forward ones."""
    calib = work / f"{model}.calib.json"
    print(f"\n== {model}: score throughput (HF engine) ==")
    if not calib.exists():
        run("calibrate", "--model", model, "--texts", files["reference"], "--out", str(calib))
    evals = work / "eval_all.jsonl"
    with evals.open("w") as out:
        for name in ("heldout", *detect_data.SHIFTS):
            out.write(Path(files[name]).read_text())
    texts = [json.loads(l)["text"] for l in evals.read_text().splitlines()]
    rates = defaultdict(list)
    for _ in range(rounds):
        rates["bare, batch 32"].append(bare_forward(model, texts, 32))
        rates["score, batch 32"].append(score_rate(model, calib, evals, work / "s32.jsonl", 32))
        rates["bare, batch 1"].append(bare_forward(model, texts, 1))
        rates["score, batch 1"].append(score_rate(model, calib, evals, work / "s1.jsonl", 1))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"  {k:18s} median {med[k]:7.1f} texts/s   (min {min(v):.1f}, max {max(v):.1f}, {len(texts)} texts)")
    ratio = med["score, batch 32"] / med["bare, batch 32"]
    print(f"  score / bare forward at batch 32: {ratio:.3f} (goal >= 0.5); at batch 1: "
          f"{med['score, batch 1'] / med['bare, batch 1']:.3f}")
    a = {r["id"]: r for r in map(json.loads, (work / "s32.jsonl").read_text().splitlines())}
    b = {r["id"]: r for r in map(json.loads, (work / "s1.jsonl").read_text().splitlines())}
    dp = max(abs(a[k]["score"] - b[k]["score"]) for k in a)
    dd = max(abs(a[k]["detectors"][d] - b[k]["detectors"][d]) / max(1.0, abs(b[k]["detectors"][d]))
             for k in a for d in b[k]["detectors"])
    flips = sum(a[k]["alert"] != b[k]["alert"] for k in a)
    print(f"  batch 32 vs batch 1: max |Δ -log10 p| {dp:.2e}, max relative Δ detector value {dd:.2e}, "
          f"alert verdicts that differ: {flips} of {len(a)}")
    return {"rates": rates, "medians": med, "ratio": ratio, "max_dlog10p": dp, "max_rel_ddetector": dd,
            "alert_flips": flips}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,tiny")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--far", default="0.01,0.05")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--far-seeds", type=int, default=1,
                    help="also calibrate with seeds 1..N-1 and report the false-alarm rate of each (default %(default)s)")
    ap.add_argument("--bound", action="store_true",
                    help="also search fixed weightings of all detectors on the shifts themselves: an upper bound "
                         "on what re-weighting the combined score could buy")
    ap.add_argument("--report", type=Path, default=None, help="write an HTML report per model into this folder")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    ap.add_argument("--throughput", action="store_true",
                    help="instead: `score` texts/s against the bare batched forward with hidden states, and the "
                         "batched scores against one text per forward")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --throughput (default %(default)s)")
    ap.add_argument("--transfer", action="store_true",
                    help="instead: the corpora (--corpora) in both regimes (sentences, paragraphs), the "
                         "transfer shifts, and a combination rule picked on each corpus reported on the others")
    ap.add_argument("--corpora", default=",".join(detect_data.CORPORA),
                    help="--transfer: which in-distribution corpora (A: CPython docs, B: man pages, C: Debian "
                         "package descriptions; default %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="with --transfer: 150 reference, 150 held-out and 50 texts per shift (a few minutes "
                         "on MiniLM)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work in this folder and keep it: the texts, CALIB.json and SCORES.jsonl per model")
    args = ap.parse_args()
    far = [float(f) for f in args.far.split(",")]
    corpora = tuple(c.strip() for c in args.corpora.split(",") if c.strip())
    if not corpora or any(c not in detect_data.CORPORA for c in corpora):
        ap.error(f"--corpora: expected comma-separated corpora among {', '.join(detect_data.CORPORA)}, "
                 f"got {args.corpora!r}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        if args.transfer:
            for model in args.models.split(","):
                results[model] = transfer(model, args.engine, work, far, args.seed, args.quick, args.bound,
                                          corpora)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
            return
        files = detect_data.build(work / "data", seed=args.seed)
        for model in args.models.split(","):
            if args.throughput:
                results[model] = throughput(model, files, work, args.rounds)
                continue
            results[model] = evaluate(model, args.engine, files, work, far, args.report, args.far_seeds, args.bound)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
