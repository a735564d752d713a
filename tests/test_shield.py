"""EigenShield (kernels/shield.py): planted-spike recovery, the RbNS gate on
pure noise, fit's spectral part and RbNS against float64 references, project
(numpy and torch) against the explicit-projector reference, the file format.

Numbers are checked against the truth of seeded simulations or the float64
references in tests/reference.py (SVD and explicit d×d projectors, not the
kernel's eigh and factored products), never against the module itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from eigenwatch.kernels import shield as S

REPO = Path(__file__).resolve().parents[1]


def planted(d: int, n_rows: int, ells, seed: int, sigma: float = 0.1, offset: float = 3.0):
    """Rows ~ offset + N(0, σ²(I + Σ (ℓ_j − 1) v_j v_jᵀ)); returns (x [N, d], V [d, k])."""
    rng = np.random.default_rng(seed)
    v, _ = np.linalg.qr(rng.standard_normal((d, len(ells))))
    z = rng.standard_normal((n_rows, d)) + (rng.standard_normal((n_rows, len(ells))) * np.sqrt(np.asarray(ells) - 1.0)) @ v.T
    return offset + sigma * z, v


def principal_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.linalg.svd(a.T @ b, compute_uv=False)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def assert_close(got, want, rtol: float, atol: float, what: str):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = ", ".join(f"{tuple(i)}: {got[tuple(i)]!r} vs {want[tuple(i)]!r}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} mismatches (rtol={rtol}, atol={atol}); first {rows}")


# --------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("d", [48, 97])
@pytest.mark.parametrize("ells", [(80.0, 50.0, 30.0, 20.0), (25.0, 25.0, 25.0)], ids=["distinct", "equal"])
def test_planted_subspace_recovered_and_nothing_else_kept(d, ells):
    # N = 20·d; equal spikes rotate among themselves between halves: the subspace RbNS must keep them all.
    x, v = planted(d, 20 * d, ells, seed=d)
    sh = S.fit(x)
    assert len(sh.spike_eigvals) == len(ells), f"spikes above the TW edge: {sh.spike_eigvals} (edge {sh.edge})"
    assert sh.rank == len(ells), f"kept {sh.rank} of {len(ells)}; rbns {sh.rbns}, threshold {sh.threshold}"
    angles = principal_angles_deg(v, sh.basis)
    assert angles.max() <= 5.0, f"principal angles {angles} deg"
    assert np.all(sh.rbns < 0.05), f"strong spikes should reappear across halves: rbns {sh.rbns}"
    assert np.median(sh.null_rbns) > 0.8, f"directions below the edge should not: null {sh.null_rbns}"


def test_noise_that_crosses_the_edge_is_not_kept():
    # alpha = 0.5 puts the TW line inside the noise's own fluctuations, so about half the
    # fits have eigenvalues above it: the RbNS gate alone must reject them.
    false_spikes, kept = 0, 0
    for d in (48, 97):
        for seed in range(12):
            x = np.random.default_rng(seed).standard_normal((20 * d, d))
            sh = S.fit(x, S.ShieldConfig(alpha=0.5))
            false_spikes += len(sh.spike_eigvals)
            kept += sh.rank
            assert S.fit(x).rank == 0, f"d={d} seed={seed}: the default config kept a pure-noise direction"
    assert false_spikes >= 5, f"only {false_spikes} noise eigenvalues crossed the edge: the gate was not exercised"
    assert kept == 0, f"kept {kept} of {false_spikes} pure-noise directions that crossed the edge"


def test_weak_spike_is_dropped_by_max_rbns_and_kept_without_it():
    # ℓ = 1.6 at γ = 0.05: above the BBP threshold (1.22), its sample eigenvector is ~25° off.
    x, _ = planted(48, 960, (1.6,), seed=1)
    sh = S.fit(x)
    assert len(sh.spike_eigvals) == 1 and 0.5 < sh.rbns[0] < sh.threshold, (sh.rbns, sh.threshold)
    assert sh.rank == 0
    assert S.with_thresholds(sh, max_rbns=1.0).rank == 1


# --------------------------------------------------------------------------- fit vs the float64 reference


SHAPES = [(97, 13), (400, 31), (61, 97), (5, 1), (50, 1), (23, 7)]


def awkward_rows(n_rows: int, d: int, seed: int) -> np.ndarray:
    """Planted spikes where d allows, plus one constant and one duplicated column."""
    rng = np.random.default_rng(seed)
    k = min(3, max(d // 6, 0))
    x, _ = planted(d, n_rows, tuple(np.linspace(40, 15, k)) if k else (), seed)
    x = x + rng.standard_normal(x.shape) * 1e-3
    if d >= 5:
        x[:, 1] = 0.25  # dead coordinate: a structural zero eigenvalue
        x[:, 3] = x[:, 2]  # linearly dependent pair: another
    return x


@pytest.mark.parametrize("n_rows,d", SHAPES)
@pytest.mark.parametrize("sigma2,alpha", [("median", 0.01), ("mppca", None)])
def test_fit_spectral_part_matches_reference(n_rows, d, sigma2, alpha):
    x = awkward_rows(n_rows, d, seed=n_rows + d)
    want = reference.shield_spectrum(x, sigma2=sigma2, alpha=alpha)
    sh = S.fit(x, S.ShieldConfig(sigma2=sigma2, alpha=alpha))
    assert_close(sh.mean, want["mean"], 1e-12, 1e-12, "mean")
    assert sh.p == want["p"]
    assert_close(sh.sigma2, want["sigma2"], 1e-9, 0, "sigma2")
    assert_close(sh.edge, want["edge"], 1e-9, 0, "edge")
    assert_close(sh.total_var, want["eigvals"].sum(), 1e-9, 0, "total variance")
    assert_close(sh.spike_eigvals, want["spike_eigvals"], 1e-9, 1e-14, "spike eigenvalues")
    assert_close(sh.spike_vectors @ sh.spike_vectors.T, want["spike_vectors"] @ want["spike_vectors"].T, 0, 1e-8, "spike projector")
    if d >= 5 and n_rows - 1 > d:
        assert sh.p == d - 2, "dead and duplicated columns leave the noise model"


def test_rbns_matches_reference_with_noise():
    x = awkward_rows(120, 13, seed=3)
    lam, vecs = S._eigh_desc(x - x.mean(axis=0), 119)
    dirs, ks = vecs[:, :6], np.array([2, 2, 3, 4, 5, 6])
    for noise_sd in (0.0, 0.05):
        got = S.rbns_scores(x, dirs, ks, splits=5, noise_sd=noise_sd, seed=11)
        want = reference.shield_rbns(x, dirs, ks, splits=5, noise_sd=noise_sd, seed=11)
        assert_close(got, want, 1e-9, 1e-9, f"rbns (noise_sd={noise_sd})")


def test_fit_is_deterministic_and_seed_matters():
    x, _ = planted(48, 960, (30.0, 10.0), seed=5)
    a, b = S.fit(x), S.fit(x)
    assert np.array_equal(a.rbns, b.rbns) and np.array_equal(a.null_rbns, b.null_rbns)
    c = S.fit(x, S.ShieldConfig(seed=1))
    assert not np.array_equal(a.rbns, c.rbns) and np.array_equal(a.kept, c.kept)


def test_with_thresholds_equals_a_refit():
    x, _ = planted(48, 960, (60.0, 30.0, 3.0, 1.8), seed=2)
    base = S.fit(x)
    for q, cap in ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0)):
        a = S.with_thresholds(base, quantile=q, max_rbns=cap)
        b = S.fit(x, S.ShieldConfig(quantile=q, max_rbns=cap))
        assert np.array_equal(a.kept, b.kept) and a.threshold == b.threshold
        assert np.array_equal(a.basis, b.basis) and a.resid_mean == b.resid_mean
        assert np.array_equal(a.kept, (a.rbns <= np.quantile(a.null_rbns, q)) & (a.rbns <= cap))


# --------------------------------------------------------------------------- project


@pytest.fixture(scope="module")
def shields():
    out = {}
    for d in (13, 97):
        x, _ = planted(d, 20 * d, (50.0, 20.0, 8.0), seed=d)
        out[d] = (S.fit(x), x)
    return out


@pytest.mark.parametrize("d", [13, 97])
@pytest.mark.parametrize("batch", [1, 7, 257])
def test_project_matches_reference(shields, d, batch):
    sh, x_ref = shields[d]
    x = x_ref[:batch] + np.random.default_rng(batch).standard_normal((batch, d)) * 0.05
    want = reference.shield_project(x, sh.mean, sh.basis, sh.resid_mean)
    got = sh.project(x)
    for g, w, name in zip(got, want, ("y", "energy", "score")):
        assert g.dtype == np.float64
        assert_close(g, w, 1e-10, 1e-12, f"float64 {name}")
    got32 = sh.project(x.astype(np.float32))
    for g, w, name in zip(got32, want, ("y", "energy", "score")):
        assert g.dtype == np.float32
        # float32: rows sit at |x| ≈ 3, so y carries ~1e-6 absolute rounding; energy is ~d·0.01
        assert_close(g, w, 2e-4, 5e-5, f"float32 {name}")


@pytest.mark.parametrize("d", [13, 97])
def test_torch_project_gives_the_same_numbers(shields, d):
    torch = pytest.importorskip("torch")
    sh, x_ref = shields[d]
    x = x_ref[:33] + 0.05
    want = sh.project(x)
    got = sh.project_torch(torch.from_numpy(x))
    for g, w, name in zip(got, want, ("y", "energy", "score")):
        assert g.dtype == torch.float64
        assert_close(g.numpy(), w, 1e-12, 1e-13, f"torch float64 {name}")
    for dtype in (torch.float32, torch.bfloat16):
        xt = torch.from_numpy(x.astype(np.float32)).to(dtype)
        got = sh.project_torch(xt)
        assert got[0].dtype == torch.float32
        # compare on the values the tensor holds (bf16 has already rounded x itself)
        want32 = sh.project(xt.to(torch.float32).numpy())
        for g, w, name in zip(got, want32, ("y", "energy", "score")):
            assert_close(g.numpy(), w, 2e-5, 2e-5, f"torch {dtype} {name}")
    if torch.cuda.is_available():
        got = sh.project_torch(torch.from_numpy(x).cuda())
        assert_close(got[0].cpu().numpy(), want[0], 1e-10, 1e-12, "torch cuda float64 y")


def test_score_is_one_on_average_over_the_reference(shields):
    sh, x = shields[97]
    out = sh.project(x)
    assert_close(out.score.mean(), 1.0, 1e-9, 0, "mean reference score")
    far = sh.project(x[:5] + 5.0 * np.linalg.svd(np.eye(97) - sh.basis @ sh.basis.T)[0][:, 0])
    assert np.all(far.score > 10), f"rows pushed off the subspace should score high: {far.score}"


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 9), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_project_properties(shields, batch, seed, scale):
    sh, _ = shields[13]
    x = sh.mean + scale * np.random.default_rng(seed).standard_normal((batch, 13))
    y, energy, score = sh.project(x)
    u = sh.basis
    # y − μ lies in span(U); projecting twice changes nothing; energy is what was removed.
    assert_close((y - sh.mean) - (y - sh.mean) @ u @ u.T, np.zeros_like(y), 0, 1e-9 * scale, "y - mean outside span(U)")
    assert_close(sh.project(y).y, y, 1e-12, 1e-12 * scale, "idempotence")
    assert_close(energy, np.sum((x - y) ** 2, axis=1), 1e-9, 1e-12 * scale**2, "energy")
    assert_close(score, energy / sh.resid_mean, 1e-12, 0, "score")


def test_empty_subspace_projects_to_the_mean():
    x = np.random.default_rng(0).standard_normal((400, 20))
    sh = S.fit(x)
    assert sh.rank == 0 and sh.basis.shape == (20, 0)
    out = sh.project(x[:3])
    assert_close(out.y, np.broadcast_to(sh.mean, (3, 20)), 0, 1e-15, "y")
    assert_close(out.energy, np.sum((x[:3] - sh.mean) ** 2, axis=1), 1e-12, 0, "energy")


# --------------------------------------------------------------------------- file format


def test_save_load_roundtrip(tmp_path, shields):
    sh, x = shields[97]
    path = tmp_path / "shield.npz"
    S.save(sh, path)
    back = S.load(path)
    for name in ("mean", "spike_vectors", "spike_eigvals", "rbns", "null_rbns", "kept", "basis"):
        assert np.array_equal(getattr(back, name), getattr(sh, name)), name
    for name in ("sigma2", "edge", "total_var", "resid_mean", "threshold", "n_rows", "p", "data_sha256", "config"):
        assert getattr(back, name) == getattr(sh, name), name
    assert np.array_equal(back.project(x[:9]).y, sh.project(x[:9]).y)
    assert back.data_sha256 == S.data_sha256(x) == S.data_sha256(x.astype(np.float64).tolist())
    assert back.data_sha256 != S.data_sha256(x[1:])
    with np.load(path) as z:
        assert str(z["format"]) == S.FORMAT and int(z["version"]) == S.VERSION
    assert os.listdir(tmp_path) == ["shield.npz"], "no temp file left behind"


def test_save_is_atomic(tmp_path, shields, monkeypatch):
    sh13, _ = shields[13]
    sh97, _ = shields[97]
    path = tmp_path / "shield.npz"
    S.save(sh13, path)
    S.save(sh97, path)  # replaces
    assert S.load(path).dim == 97

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(S.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        S.save(sh13, path)
    monkeypatch.undo()
    assert S.load(path).dim == 97, "a failed save must leave the old file intact"
    assert os.listdir(tmp_path) == ["shield.npz"]


def rewrite(src: Path, dst: Path, **changes):
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    "case,match",
    [
        ("garbage", "corrupt"),
        ("truncated", "corrupt"),
        ("npy", "not an .npz"),
        ("version", "version 3, this eigenwatch reads versions 1, 2"),
        ("format", "format"),
        ("missing", "missing field 'rbns'"),
        ("mean_shape", "wrong shape: mean"),
        ("vectors_shape", "wrong shape: spike_vectors"),
        ("rbns_shape", "wrong shape: rbns"),
        ("not_orthonormal", "not orthonormal"),
        ("kept", "kept does not match"),
        ("nan", "NaN"),
        ("sha", "data_sha256"),
        ("config", "config: quantile"),
    ],
)
def test_load_errors_name_the_file_and_the_problem(tmp_path, shields, case, match):
    sh, _ = shields[13]
    good = tmp_path / "good.npz"
    S.save(sh, good)
    bad = tmp_path / f"{case}.npz"
    s = len(sh.rbns)
    if case == "garbage":
        bad.write_bytes(b"not a zip file at all")
    elif case == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "npy":
        with open(bad, "wb") as f:
            np.save(f, sh.mean)
    elif case == "version":
        rewrite(good, bad, version=np.array(3))
    elif case == "format":
        rewrite(good, bad, format=np.array("something.else"))
    elif case == "missing":
        rewrite(good, bad, rbns=None)
    elif case == "mean_shape":
        rewrite(good, bad, mean=np.zeros((13, 1)))
    elif case == "vectors_shape":
        rewrite(good, bad, spike_vectors=np.zeros((14, s)))
    elif case == "rbns_shape":
        rewrite(good, bad, rbns=np.zeros(s + 1))
    elif case == "not_orthonormal":
        rewrite(good, bad, spike_vectors=sh.spike_vectors * 2.0)
    elif case == "kept":
        rewrite(good, bad, kept=~sh.kept)
    elif case == "nan":
        rewrite(good, bad, mean=np.full(13, np.nan))
    elif case == "sha":
        rewrite(good, bad, data_sha256=np.array("xyz"))
    elif case == "config":
        rewrite(good, bad, config=np.array('{"quantile": 7}'))
    with pytest.raises(S.ShieldFileError, match=match) as info:
        S.load(bad)
    assert str(bad) in str(info.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        S.load(tmp_path / "nope.npz")


def test_unreadable_member_is_reported(tmp_path):
    # A valid zip whose member is not a .npy: numpy's ValueError must surface as ShieldFileError.
    path = tmp_path / "cut.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("format.npy", b"\x93NUMPY")
    with pytest.raises(S.ShieldFileError, match=str(path)):
        S.load(path)


# --------------------------------------------------------------------------- arguments and imports


@pytest.mark.parametrize(
    "ref,match",
    [
        (np.zeros(10), r"reference: expected \[N, d\]"),
        (np.zeros((3, 4)), "N >= 4"),
        (np.full((10, 3), np.nan), "NaN"),
        (np.array([["a", "b"]] * 5), "real numeric"),
        (np.ones((10, 3)), "zero variance"),
    ],
)
def test_fit_rejects_bad_reference(ref, match):
    with pytest.raises(ValueError, match=match):
        S.fit(ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sigma2": "naive"}, "sigma2"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"quantile": -0.1}, "quantile"),
        ({"max_rbns": 0.0}, "max_rbns"),
        ({"splits": 0}, "splits"),
        ({"null_dirs": 0}, "null_dirs"),
        ({"noise": -1.0}, "noise"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.ShieldConfig(**kwargs)


def test_too_many_spikes_is_refused_with_a_fix():
    x, _ = planted(8, 400, (50, 40, 30, 20, 10), seed=0)
    # MP-PCA puts σ² at the tail, so 5 of 8 directions are spikes: no bulk left for the null.
    with pytest.raises(ValueError, match="5 of its 8 non-zero directions.*fewer than half.*sigma2='median'"):
        S.fit(x, S.ShieldConfig(sigma2="mppca"))


def test_project_rejects_bad_rows(shields):
    sh, _ = shields[13]
    with pytest.raises(ValueError, match=r"x: expected \[B, 13\], got shape \(3, 12\)"):
        sh.project(np.zeros((3, 12)))
    with pytest.raises(ValueError, match=r"x: expected \[B, 13\]"):
        sh.project(np.zeros(13))
    with pytest.raises(ValueError, match="real numeric"):
        sh.project(np.zeros((2, 13), dtype=complex))


def test_module_imports_with_numpy_only():
    code = (
        "import sys; import eigenwatch.kernels.shield; "
        "bad = [m for m in ('torch', 'scipy', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- calibration scores (file version 2)


def test_fit_carries_the_reference_rows_scores(shields):
    sh, x = shields[97]
    want = np.sort(reference.shield_project(x, sh.mean, sh.basis, sh.resid_mean)[2])
    assert_close(sh.calib_scores, want, 1e-9, 1e-12, "in-sample calib_scores")
    assert_close(sh.calib_scores.mean(), 1.0, 1e-9, 0, "mean in-sample score")


def test_score_threshold_is_the_conformal_rank_and_holds_its_level():
    x, _ = planted(13, 3600, (50.0, 20.0, 8.0), seed=5)
    fit_rows, cal_rows, fresh = x[:600], x[600:1599], x[1599:]  # M = 999 calibration rows
    sh = S.calibrate(S.fit(fit_rows), cal_rows)
    want = np.sort(reference.shield_project(cal_rows, sh.mean, sh.basis, sh.resid_mean)[2])
    assert_close(sh.calib_scores, want, 1e-9, 1e-12, "held-out calib_scores")
    assert S.score_threshold(sh, 0.9) == sh.calib_scores[899]  # ⌈1000·0.9⌉ = 900th smallest
    assert S.score_threshold(sh, 0.9995) == float("inf")  # ⌈1000·0.9995⌉ = 1000 > 999
    # split conformal: fresh clean rows above the 0.9 threshold ≈ 10% (2001 rows: s.e. ≈ 0.7%)
    rate = float(np.mean(sh.project(fresh).score > S.score_threshold(sh, 0.9)))
    assert 0.07 < rate < 0.13, rate
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"quantile: expected a level in \(0, 1\)"):
            S.score_threshold(sh, bad)
    with pytest.raises(ValueError, match=r"calibration rows: expected a real \[M, 13\]"):
        S.calibrate(sh, x[:5, :12])
    with pytest.raises(ValueError, match="NaN or Inf"):
        S.calibrate(sh, np.full((2, 13), np.nan))


def test_with_thresholds_keeps_the_scores_only_with_the_same_basis():
    x, _ = planted(48, 960, (60.0, 30.0, 3.0, 1.8), seed=2)
    base = S.fit(x)
    same = S.with_thresholds(base, quantile=base.config.quantile)
    assert np.array_equal(same.calib_scores, base.calib_scores)
    every = S.with_thresholds(base, max_rbns=0.05)
    assert every.rank < base.rank, "the test needs a threshold change that moves the basis"
    assert every.calib_scores.shape == (0,)
    with pytest.raises(ValueError, match="no calibration scores"):
        S.score_threshold(every, 0.99)
    refit = S.fit(x, S.ShieldConfig(max_rbns=0.05))
    assert_close(S.calibrate(every, x).calib_scores, refit.calib_scores, 1e-12, 1e-12, "recalibrated scores")


def test_version_2_keeps_the_scores_and_version_1_files_still_load(tmp_path, shields):
    sh, x = shields[13]
    sh = S.calibrate(sh, x[:50])
    v2, v1 = tmp_path / "v2.npz", tmp_path / "v1.npz"
    S.save(sh, v2)
    assert np.array_equal(S.load(v2).calib_scores, sh.calib_scores)
    rewrite(v2, v1, version=np.array(1), calib_scores=None)  # what version 1 wrote
    old = S.load(v1)
    assert old.calib_scores.shape == (0,) and np.array_equal(old.basis, sh.basis)
    with pytest.raises(ValueError, match="no calibration scores"):
        S.score_threshold(old, 0.99)
    for name, value, match in (("missing.npz", None, "missing field 'calib_scores'"),
                               ("unsorted.npz", sh.calib_scores[::-1], "calib_scores: expected finite scores"),
                               ("shape.npz", sh.calib_scores[:, None], "wrong shape: calib_scores")):
        rewrite(v2, tmp_path / name, calib_scores=value)
        with pytest.raises(S.ShieldFileError, match=match):
            S.load(tmp_path / name)
