"""`eigenwatch report`: synthetic SCORES files in, one HTML page out.

Reference scores ~ N(0, 1), positive sets shifted; spectra come from real
Gaussian windows processed like the tap does (float64 window spectra,
then descriptors.describe for trace_mean and sigma2), one of them with planted
rank-3 signal so it has spikes. AUROCs are checked against detect.auroc and the
spike count against descriptors.count_spikes, both computed here independently.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from eigenwatch.kernels.descriptors import INDEX, count_spikes, describe
from eigenwatch.kernels.rmt import mp_edges

import reference
from eigenwatch.monitor.cli.main import main
from eigenwatch.monitor.combined import auroc
from eigenwatch.monitor.offline.report import COMBINED, roc_curve, spectrum_view

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
W, D = 32, 256
DETECTORS = ("descriptor_mahalanobis", "hidden_mahalanobis", "spectral_spike")


def tap_window(X: torch.Tensor) -> tuple[np.ndarray, float]:
    """(eigenvalues / trace_mean, sigma2 / trace_mean) of one window, as offline features hold it."""
    eigs, rows = reference.window_spectrum(X.numpy())
    desc = describe(eigs, X.shape[0], X.shape[1], row_sq_norms=rows)
    tm = desc[INDEX["trace_mean"]]
    return eigs / tm, float(desc[INDEX["sigma2"]] / tm)


def noise_windows(n: int, w: int, d: int, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return [tap_window(scale * torch.randn(w, d, generator=g, dtype=torch.float64)) for _ in range(n)]


def spiked_window(seed: int, strength=(40.0, 25.0, 15.0)) -> np.ndarray:
    """Noise plus a rank-3 signal far above the BBP threshold: 3 eigenvalues leave the bulk."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(W, D, generator=g, dtype=torch.float64)
    for s in strength:
        u = torch.randn(W, 1, generator=g, dtype=torch.float64)
        v = torch.randn(1, D, generator=g, dtype=torch.float64)
        X += (s / W) ** 0.5 * u @ v  # adds ≈ s·(u uᵀ/W) to the Gram / d: an eigenvalue ≈ s
    return tap_window(X)[0]


def spectrum(eigs, sigma2, layer=2, token_count=77):
    return {"layer": layer, "token_count": token_count, "window": W, "dim": D, "sigma2": sigma2,
            "eigenvalues": [float(e) for e in eigs]}


def line(rid, rng, shift, spike_mean, spec=None, score=None):
    s = float(rng.normal(shift, 1.0)) if score is None else score
    obj = {
        "id": rid,
        "score": s,
        "detectors": {
            "descriptor_mahalanobis": float(rng.normal(2 * shift, 1.0)),
            "hidden_mahalanobis": float(rng.normal(0.3 * shift, 1.0)),
            "spectral_spike": int(rng.poisson(spike_mean)) - 3,  # integer: many ties
        },
        "alert": s > 2.0,
        "p_value": 10 ** -max(s, 0.0),
    }
    if spec is not None:
        obj["spectrum"] = spec
    return obj


def dump(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    noise = noise_windows(24, W, D, seed=1)
    sigma2 = float(np.median([s for _, s in noise]))  # calibrated σ², as SpectralSpike.fit does
    top_eigs = spiked_window(seed=7)
    ref = [line(f"r{i}", rng, 0.0, 2.0, spectrum(noise[i][0], sigma2) if i < 8 else None) for i in range(200)]
    shifted = [line(f"s{i}", rng, 2.5, 4.0, spectrum(noise[8 + i][0], sigma2) if i < 8 else None)
               for i in range(80)]
    # The highest combined score among lines with a spectrum (scores of N(2.5, 1) stay far below 10).
    shifted.append(line("s_top", rng, 2.5, 6.0, spectrum(top_eigs, sigma2, layer=3, token_count=130), score=10.0))
    mild = [line(f"m{i}", rng, 0.4, 2.3) for i in range(60)]
    return {
        "dir": d,
        "ref": dump(d / "ref_scores.jsonl", ref),
        "shifted": dump(d / "shifted.jsonl", shifted),
        "mild": dump(d / "mild.jsonl", mild),
        "objs": {"ref": ref, "shifted": shifted, "mild": mild},
        "sigma2": sigma2,
        "top_eigs": top_eigs,
        "noise": noise,
    }


def run(capsys, *argv):
    rc = main(["report", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)]


def values(objs, key):
    return [o["score"] if key == COMBINED else o["detectors"][key] for o in objs]


# ---------------------------------------------------------------- the report

def test_report_with_reference(data, capsys):
    out = data["dir"] / "sub" / "report.html"
    rc, stdout, err = run(capsys, data["shifted"], data["mild"], "--reference", data["ref"],
                          "--out", out, "--title", "run <1> & co")
    assert rc == 0, err
    page = out.read_text()
    assert "<title>run &lt;1&gt; &amp; co</title>" in page
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # no temp file left behind
    # ROC, combined histogram, per-detector histograms, spectrum; nothing loaded from elsewhere.
    pngs = images(page)
    assert len(pngs) == 4 and len(re.findall(r"<img ", page)) == 4
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    assert "<script" not in page and "<link" not in page and "http" not in page

    cells = re.findall(r'<td class="(auc(?: best)?)" data-set="([^"]+)" data-detector="([^"]+)" '
                       r'data-auroc="([^"]+)">([^<]+)</td>', page)
    assert len(cells) == 2 * (len(DETECTORS) + 1)
    objs = data["objs"]
    got = {(s, k): (cls, float(a), shown) for cls, s, k, a, shown in cells}
    for s in ("shifted", "mild"):
        expect = {k: auroc(values(objs["ref"], k), values(objs[s], k)) for k in (*DETECTORS, COMBINED)}
        for k, a in expect.items():
            cls, val, shown = got[(s, k)]
            assert val == a and shown == f"{a:.3f}"
            assert (cls == "auc best") == (a == max(expect.values())), (s, k)
            # the terminal table shows the same numbers (best marked with *)
            row = next(r for r in stdout.splitlines() if r.startswith(s + " "))
            assert f"{a:.3f}" in row
    # the shifted set is clearly separated by the combined score and by the 2x-shifted detector
    assert got[("shifted", COMBINED)][1] > 0.95 and got[("shifted", "descriptor_mahalanobis")][1] > 0.99
    # alert rates
    for s in ("shifted", "mild"):
        rate = float(re.search(rf'data-set="{s}" data-alert-rate="([^"]+)"', page).group(1))
        assert rate == np.mean([o["alert"] for o in objs[s]])

    # spectrum: the highest combined score with a spectrum, spike count by count_spikes
    sec = re.search(r'<section id="spectrum" data-request="([^"]+)" data-set="([^"]+)" data-spikes="(\d+)">', page)
    assert sec.group(1) == "s_top" and sec.group(2) == "shifted"
    k = count_spikes(data["top_eigs"], W, D, data["sigma2"])
    assert k >= 3 and int(sec.group(3)) == k
    assert f'<span class="spikes">{k}</span> eigenvalue(s) above λ+' in page
    assert "layer 3" in page and "token_count 130" in page and f"W = {W}" in page and f"d = {D}" in page


def test_request_flag_shows_that_line(data, capsys):
    out = data["dir"] / "req.html"
    rc, _, err = run(capsys, data["shifted"], "--reference", data["ref"], "--out", out, "--request", "r3")
    assert rc == 0, err
    page = out.read_text()
    sec = re.search(r'<section id="spectrum" data-request="([^"]+)" data-set="([^"]+)" data-spikes="(\d+)">', page)
    assert sec.group(1) == "r3" and sec.group(2) == "ref_scores"
    assert int(sec.group(3)) == count_spikes(data["noise"][3][0], W, D, data["sigma2"])
    assert len(images(page)) == 4


def test_without_reference(data, capsys):
    out = data["dir"] / "noref.html"
    rc, stdout, err = run(capsys, data["shifted"], data["mild"], "--out", out)
    assert rc == 0, err
    page = out.read_text()
    assert "No <code>--reference</code> file was given" in page and "no ROC curves" in page
    assert "data-auroc" not in page
    pngs = images(page)
    assert len(pngs) == 3 and all(p.startswith(PNG_MAGIC) for p in pngs)  # no ROC figure
    assert "no --reference" in stdout
    assert re.search(r'data-request="s_top"', page)


def test_no_spectrum_anywhere(data, capsys):
    out = data["dir"] / "nospec.html"
    rc, _, err = run(capsys, data["mild"], "--out", out)
    assert rc == 0, err
    page = out.read_text()
    assert len(images(page)) == 2 and 'id="spectrum"' not in page
    assert "No line carries a <code>\"spectrum\"</code> field" in page


def test_import_does_not_load_matplotlib():
    code = "import sys, eigenwatch.monitor.offline.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- statistics

def test_roc_curve_area_equals_auroc():
    rng = np.random.default_rng(3)
    neg = rng.integers(0, 6, 97).astype(float)  # heavy ties
    pos = rng.integers(2, 9, 41).astype(float)
    fpr, tpr = roc_curve(neg, pos)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(neg, pos), abs=1e-12)
    cont_neg, cont_pos = rng.normal(size=50), rng.normal(1, 1, size=30)
    f2, t2 = roc_curve(cont_neg, cont_pos)
    assert len(f2) == 81 and np.trapezoid(t2, f2) == pytest.approx(auroc(cont_neg, cont_pos), abs=1e-12)


@pytest.mark.parametrize("w,d", [(32, 256), (48, 24)])  # γ = 0.12 and γ ≈ 1.96 (> 1: only d non-zero)
def test_mp_density_matches_noise_windows(w, d):
    """The plotted MP density (report.SpectrumView, the detector's convention)
    against the pooled spectra of pure-noise windows processed like the tap."""
    wins = noise_windows(150, w, d, seed=w * 1000 + d)
    sigma2 = float(np.median([s for _, s in wins]))  # calibrated as SpectralSpike.fit
    views = [spectrum_view({"eigenvalues": e, "window": w, "dim": d, "sigma2": sigma2}) for e, _ in wins]
    v = views[0]
    assert v.gamma == (w - 1) / d and v.p == min(w - 1, d)
    assert (v.lo, v.hi) == mp_edges((w - 1) / d, sigma2)
    # in units of the window's mean non-zero eigenvalue, pure noise has σ² ≈ 1/max(1, γ)
    assert sigma2 == pytest.approx(1.0 / max(1.0, v.gamma), rel=0.05)
    assert all(x.spikes == count_spikes(e, w, d, sigma2) for x, (e, _) in zip(views, wins))

    def fit(eigs):
        inside = float(np.mean((eigs >= v.lo) & (eigs <= v.hi)))
        edges = np.linspace(0.0, 1.3 * v.hi, 27)
        emp = np.histogram(eigs, edges)[0] / len(eigs)
        x, y = v.curve(1.3 * v.hi, n=6001)  # the curve the report draws
        cum = np.r_[0.0, np.cumsum(np.diff(x) * 0.5 * (y[1:] + y[:-1]))]
        model = np.diff(np.interp(edges, x, cum))
        return inside, 0.5 * float(np.abs(emp - model).sum())  # total-variation distance of bin masses

    nz = np.concatenate([x.nonzero for x in views])
    inside, tv = fit(nz)
    assert inside > 0.97, inside
    assert tv < 0.06, tv
    # The same check has teeth: a 25% scale error, or counting the zeroed
    # eigenvalues in, is rejected.
    assert fit(1.25 * nz)[1] > max(3 * tv, 0.08)
    assert fit(np.concatenate([x.eigenvalues for x in views]))[0] < inside - 0.015


# ---------------------------------------------------------------- bad input

def test_missing_files(data, capsys):
    out = data["dir"] / "missing.html"
    rc, _, err = run(capsys, data["dir"] / "nope.jsonl", "--out", out)
    assert rc == 2 and "SCORES.jsonl: cannot read" in err and "nope.jsonl" in err
    rc, _, err = run(capsys, data["mild"], "--reference", data["dir"] / "noref.jsonl", "--out", out)
    assert rc == 2 and "--reference: cannot read" in err and "noref.jsonl" in err
    assert not out.exists()


def test_malformed_lines_are_skipped(data, capsys, tmp_path):
    rng = np.random.default_rng(5)
    good = [line(f"g{i}", rng, 1.0, 2.0) for i in range(6)]
    bad_spec = line("g_badspec", rng, 1.0, 2.0, spec=dict(spectrum(data["top_eigs"], 1.0), window=7))
    rows = [json.dumps(o) for o in good[:3]] + [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({k: v for k, v in good[3].items() if k != "alert"} | {"id": "no_alert"}),
        json.dumps(dict(good[4], id="g0")),  # duplicate id
        json.dumps(dict(good[4], id="str_det", detectors={"descriptor_mahalanobis": "high"})),
        json.dumps(dict(good[4], id="nan_score", score=float("nan"))),
        json.dumps(bad_spec),
    ] + [json.dumps(o) for o in good[3:]]
    f = tmp_path / "messy.jsonl"
    f.write_text("\n".join(rows) + "\n\n")
    out = tmp_path / "messy.html"
    rc, stdout, err = run(capsys, f, "--reference", data["ref"], "--out", out)
    assert rc == 0, err
    assert f"{f}:4: skipped: not valid JSON" in err
    assert f"{f}:5: skipped: expected a JSON object" in err
    assert f'{f}:6: skipped: "alert" must be true or false' in err
    assert f"{f}:7: skipped: duplicate id 'g0' (first on line 1)" in err
    assert f'{f}:8: skipped: "detectors.descriptor_mahalanobis" must be a finite number, got \'high\'' in err
    assert f'{f}:9: skipped: "score" must be a finite number' in err
    assert f'{f}:10: spectrum ignored (scores kept): "spectrum.eigenvalues" must be a list of 7 numbers' in err
    row = next(r for r in stdout.splitlines() if r.startswith("messy "))
    assert row.split()[1] == "7"  # 6 good lines + the one whose spectrum was dropped
    page = out.read_text()
    assert "6 skipped" in page and "1 spectrum field(s) ignored" in page
    sec = re.search(r'data-request="([^"]+)"', page)
    assert sec.group(1) != "g_badspec"


def test_file_without_usable_line(data, capsys, tmp_path):
    f = tmp_path / "allbad.jsonl"
    f.write_text("\n".join([
        "garbage",
        json.dumps({"id": "a", "score": 1.0, "detectors": {"x": "high"}, "alert": False}),
        json.dumps({"id": "b", "score": 1.0, "detectors": {"x": None}, "alert": False}),
    ]) + "\n")
    out = tmp_path / "r.html"
    rc, _, err = run(capsys, f, "--out", out)
    assert rc == 2
    assert f"SCORES.jsonl: {f} holds no usable score line (3 line(s) read, 3 skipped" in err
    assert '"detectors.x" must be a finite number' in err
    rc, _, err = run(capsys, data["mild"], "--reference", f, "--out", out)
    assert rc == 2 and f"--reference: {f} holds no usable score line" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = run(capsys, empty, "--out", out)
    assert rc == 2 and "holds no usable score line (0 line(s) read" in err
    assert not out.exists()


def test_request_errors_keep_old_report(data, capsys):
    out = data["dir"] / "keep.html"
    out.write_text("old report")
    rc, _, err = run(capsys, data["shifted"], "--reference", data["ref"], "--out", out, "--request", "zzz")
    assert rc == 2
    assert f"--request 'zzz': no line with this id in {data['shifted']}, {data['ref']}" in err
    rc, _, err = run(capsys, data["shifted"], "--out", out, "--request", "s50")  # a line without spectrum
    assert rc == 2 and "--request 's50': found at" in err and 'without a usable "spectrum"' in err
    assert out.read_text() == "old report"


def test_out_is_a_directory(data, capsys):
    rc, _, err = run(capsys, data["mild"], "--out", data["dir"])
    assert rc == 2 and "--out:" in err and "is a directory" in err
