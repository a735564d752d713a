"""The sidecar's live combined score (monitor/sidecar/combined.py) over real gRPC:
final frames carrying hidden-state statistics give the request the p-value the
offline Combined computes from the same voter values, an alert below the
calibrated rate, and GetReport's `combined`; statistics made against another
calibration, covering other rows than the frames, or missing a layer give no
score and are counted by reason — never a wrong score."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest

from conftest import SidecarClient, free_port, metric_value, scrape, wait_for
from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
from eigenwatch.kernels.hidden_stats import LinearProbe, calibration_id
from eigenwatch.monitor import calibration as calib
from eigenwatch.monitor.combined import Combined
from eigenwatch.monitor.llmcheck import LLMCheckHidden
from eigenwatch.monitor.mahalanobis import ShrinkageGaussian
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

LAYERS = (0, 2, 5)  # LLM-Check reads the middle one, 2
FAR = 0.05
SPIKE = {("m", l): calib.LayerCalibration(sigma2=0.6, spike_threshold=99) for l in LAYERS}  # never fires


def _calibration(path, rng):
    g = {l: ShrinkageGaussian().fit(rng.standard_normal((20, 4))).state() for l in LAYERS}
    dets = {"token_mahalanobis": {"layers": {str(l): g[l] for l in LAYERS}},
            "hidden_mahalanobis": {"layers": {str(l): g[l] for l in LAYERS[:2]}},
            "llmcheck_hidden": LLMCheckHidden().fit([{"llmcheck": v} for v in rng.normal(1.0, 0.2, 40)]).state()}
    cal_scores = {"token_mahalanobis": rng.gamma(4.0, 0.25, 60), "hidden_mahalanobis": rng.gamma(4.0, 0.25, 60),
                  "llmcheck_hidden": np.abs(rng.standard_normal(60))}
    comb = Combined().fit(cal_scores, weights={"token_mahalanobis": 0.5, "hidden_mahalanobis": 0.2,
                                               "llmcheck_hidden": 0.3})
    offline = {"layers": list(LAYERS), "window": 8, "stride": 4, "alert_far": FAR, "detectors": dets,
               "combined": comb.state()}
    calib.save(path, calib.document(SPIKE, model_fingerprint={"name": "m"}, offline=offline))
    return comb, LLMCheckHidden.from_state(dets["llmcheck_hidden"]), calibration_id(dets)


def _final(rid, layer, rows, token, pooled, llm, cal_id, token_count=None):
    eigs = [4.0, 2.0, 1.0, 0.5, 0.25, 0.0]
    desc = [0.0] * len(DESCRIPTOR_NAMES)
    desc[DESCRIPTOR_NAMES.index("sigma2")] = 0.6
    desc[DESCRIPTOR_NAMES.index("trace_mean")] = 1.55
    h = monitor_pb2.HiddenStats(rows=rows, token_sqdist=token, pooled_sqdist=pooled, calibration=cal_id)
    if llm is not None:
        h.llmcheck = llm
    return monitor_pb2.Frame(request_id=rid, engine_request_id=rid + "-0123abcd", model="m", layer=layer, step=1,
                             token_count=rows if token_count is None else token_count, window=len(eigs), dim=16,
                             eigenvalues=eigs, descriptors=desc, final=True, hidden=h)


def _request(rid, vals, cal_id, rows=40, **kw):
    """Final frames of all layers: vals {layer: (token, pooled)}, LLM-Check 1.0 + vals['llm']."""
    return [_final(rid, l, rows, *vals[l], vals["llm"] if l == 2 else None, cal_id, **kw) for l in LAYERS]


def test_live_combined_p_value_alert_report_and_refusals(sidecar_factory, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "CALIB.json"
    comb, llm, cal_id = _calibration(path, rng)
    sc = sidecar_factory("--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0", "--calibration", str(path))
    # layer 5 has no pooled Gaussian: the tap sends NaN there, which nothing reads
    ordinary = {0: (1.0, 0.9), 2: (0.8, 1.1), 5: (1.2, float("nan")), "llm": 1.05}
    far_out = {0: (6.0, 5.0), 2: (7.0, 4.0), 5: (5.0, float("nan")), "llm": 3.0}
    frames = (_request("ok", ordinary, cal_id) + _request("odd", far_out, cal_id)
              + _request("other", far_out, "0123456789abcdef")  # statistics against another file
              + _request("partial", far_out, cal_id, token_count=41)  # cover other rows than the windows
              + _request("missing", ordinary, cal_id)[:2]  # layer 5's final frame never came
              + _request("nan", {**ordinary, 0: (float("nan"), 0.9)}, cal_id))  # NaN where it is read
    frames.append(_final("nostats", 0, 40, 0, 0, None, cal_id))
    frames[-1].ClearField("hidden")
    channel = grpc.insecure_channel(sc.grpc)
    stub = monitor_pb2_grpc.MonitorStub(channel)
    stub.Ingest(iter([monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=frames)]), timeout=10)
    client = SidecarClient(sc.grpc)
    want = {}
    for rid, v in (("ok", ordinary), ("odd", far_out)):
        voters = {"token_mahalanobis": np.mean([v[l][0] for l in LAYERS]),
                  "hidden_mahalanobis": np.mean([v[l][1] for l in LAYERS[:2]]),
                  "llmcheck_hidden": llm.score([{"llmcheck": v["llm"]}])[0]}
        want[rid] = (float(comb.p_values({k: np.array([x]) for k, x in voters.items()})[0]), voters)
    for rid, (p, voters) in want.items():
        rep = wait_for(lambda: (r := client.try_report(rid)) is not None and r.combined.final and r,
                       what=f"the combined score of {rid}")
        c = rep.combined
        assert c.p_value == pytest.approx(p, rel=1e-12) and c.score == pytest.approx(-math.log10(p))
        assert c.alert == (p < FAR) and c.alert_far == FAR
        assert dict(c.detectors) == pytest.approx(voters, rel=1e-12)
        combined_alerts = [a for a in rep.alerts if a.detector == "combined"]
        assert len(combined_alerts) == int(p < FAR)
    assert not want["ok"][0] < FAR and want["odd"][0] < FAR  # the test data makes one of each
    for rid in ("other", "partial", "missing", "nostats", "nan"):
        assert not client.report(rid).HasField("combined"), rid
    text = scrape(sc.metrics + "/metrics")
    for result, n in (("scored", 1), ("alert", 1), ("other_calibration", 1), ("partial", 1), ("incomplete", 1),
                      ("no_statistics", 1), ("invalid", 1)):
        assert metric_value(text, "eigenwatch_combined_requests_total", model="m", result=result) == n, result
    assert metric_value(text, "eigenwatch_combined_score_count", model="m") == 2
    assert metric_value(text, "eigenwatch_alerts_total", model="m", detector="combined", severity="warning") == 1
    client.close()
    channel.close()


def test_a_combined_score_the_sidecar_cannot_compute_live_is_off_with_a_reason(sidecar_factory, tmp_path):
    """A calibration whose voters include an offline-only detector (descriptor_mahalanobis:
    `calibrate --risk-model none`) serves without a combined score and says why."""
    rng = np.random.default_rng(1)
    path = tmp_path / "CALIB.json"
    comb = Combined().fit({"descriptor_mahalanobis": rng.random(30), "token_mahalanobis": rng.random(30)})
    calib.save(path, calib.document(SPIKE, model_fingerprint={"name": "m"}, offline={
        "layers": list(LAYERS), "window": 8, "stride": 4, "alert_far": FAR, "detectors": {}, "combined": comb.state()}))
    sc = sidecar_factory("--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0", "--calibration", str(path))
    logged = "\n".join(sc.lines)
    assert "no live combined score" in logged and "descriptor_mahalanobis are computed offline only" in logged
    assert "eigenwatch_combined_requests_total" not in scrape(sc.metrics + "/metrics")


def test_running_value_during_generation_never_alerts_and_the_final_one_replaces_it(sidecar_factory, tmp_path):
    """Non-final frames carry running statistics: GetReport shows a running value (final
    false) computed without LLM-Check (no evidence until the final frame), even far out it
    raises no alert and is not in the metric; the final frames replace it with the request's value."""
    rng = np.random.default_rng(2)
    path = tmp_path / "CALIB.json"
    comb, llm, cal_id = _calibration(path, rng)
    sc = sidecar_factory("--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0", "--calibration", str(path))
    far_out = {0: (6.0, 5.0), 2: (7.0, 4.0), 5: (5.0, float("nan")), "llm": 3.0}
    running = [f for f in _request("gen", far_out, cal_id, rows=16)]
    for f in running:
        f.final = False
        f.hidden.ClearField("llmcheck")
    channel = grpc.insecure_channel(sc.grpc)
    stub = monitor_pb2_grpc.MonitorStub(channel)
    stub.Ingest(iter([monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=running)]), timeout=10)
    client = SidecarClient(sc.grpc)
    rep = wait_for(lambda: (r := client.try_report("gen")) is not None and r.HasField("combined") and r,
                   what="the running value")
    voters = {"token_mahalanobis": np.mean([far_out[l][0] for l in LAYERS]),
              "hidden_mahalanobis": np.mean([far_out[l][1] for l in LAYERS[:2]])}
    p = float(comb.p_values({k: np.array([v]) for k, v in voters.items()})[0])  # llmcheck: p = 1
    c = rep.combined
    assert not c.final and c.rows == 16 and not c.alert and p < FAR
    assert c.p_value == pytest.approx(p, rel=1e-12) and set(c.detectors) == set(voters)
    assert not [a for a in rep.alerts if a.detector == "combined"]
    stub.Ingest(iter([monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES,
                                             frames=_request("gen", far_out, cal_id, rows=40))]), timeout=10)
    rep = wait_for(lambda: (r := client.report("gen")).combined.final and r, what="the final value")
    assert rep.combined.rows == 40 and rep.combined.alert and "llmcheck_hidden" in rep.combined.detectors
    assert len([a for a in rep.alerts if a.detector == "combined"]) == 1
    text = scrape(sc.metrics + "/metrics")
    assert metric_value(text, "eigenwatch_combined_score_count", model="m") == 1
    client.close()
    channel.close()


def test_token_probe_votes_live_from_its_layers_probe_logit(sidecar_factory, tmp_path):
    """A calibration whose voters include token_probe: the p-value of the offline Combined
    from the probe_logit the tap sends at the probe's layer; final frames without it (a
    tap that loaded an older file) give no score, counted as incomplete."""
    rng = np.random.default_rng(3)
    path = tmp_path / "CALIB.json"
    g = {l: ShrinkageGaussian().fit(rng.standard_normal((20, 4))).state() for l in LAYERS}
    dets = {"token_mahalanobis": {"layers": {str(l): g[l] for l in LAYERS}},
            "token_probe": LinearProbe(5, rng.standard_normal(4), 0.1).state()}
    comb = Combined().fit({"token_mahalanobis": rng.gamma(4.0, 0.25, 60), "token_probe": rng.normal(0.0, 1.0, 60)},
                          weights={"token_mahalanobis": 0.3, "token_probe": 0.7})
    calib.save(path, calib.document(SPIKE, model_fingerprint={"name": "m"}, offline={
        "layers": list(LAYERS), "window": 8, "stride": 4, "alert_far": FAR, "detectors": dets,
        "combined": comb.state()}))
    cal_id = calibration_id(dets)
    sc = sidecar_factory("--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0", "--calibration", str(path))

    def request(rid, logit):
        frames = [_final(rid, l, 30, 1.0, float("nan"), None, cal_id) for l in LAYERS]
        if logit is not None:
            frames[2].hidden.probe_logit = logit  # layer 5, the probe's
        return frames

    channel = grpc.insecure_channel(sc.grpc)
    stub = monitor_pb2_grpc.MonitorStub(channel)
    stub.Ingest(iter([monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=request("plain", 0.0)
                                             + request("odd", 9.0) + request("older_tap", None))]), timeout=10)
    client = SidecarClient(sc.grpc)
    for rid, logit in (("plain", 0.0), ("odd", 9.0)):
        voters = {"token_mahalanobis": 1.0, "token_probe": logit}
        p = float(comb.p_values({k: np.array([v]) for k, v in voters.items()})[0])
        rep = wait_for(lambda: (r := client.try_report(rid)) is not None and r.combined.final and r,
                       what=f"the combined score of {rid}")
        assert rep.combined.p_value == pytest.approx(p, rel=1e-12) and rep.combined.alert == (p < FAR)
        assert dict(rep.combined.detectors) == pytest.approx(voters, rel=1e-12)
        assert (p < FAR) == (rid == "odd")  # the test data makes one of each
    assert not client.report("older_tap").HasField("combined")
    text = scrape(sc.metrics + "/metrics")
    assert metric_value(text, "eigenwatch_combined_requests_total", model="m", result="incomplete") == 1
    client.close()
    channel.close()
