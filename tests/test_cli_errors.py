"""Every CLI input error is a message naming the flag or field, exit code 2 and
no traceback: the `eigenwatch` command run as a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

WORDS = ("the quick brown fox jumps over the lazy dog and then runs far away into the forest where it sleeps "
         "under an old tree until the morning light wakes it").split()


def _cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIGENWATCH_")}
    return subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _refused(out, *expect, absent=()):
    err = out.stderr
    assert out.returncode == 2, (out.returncode, err[-2000:])
    assert "Traceback" not in err + out.stdout, err[-2000:]
    for text in expect:
        assert text in err, (text, err[-2000:])
    for text in absent:
        assert text not in err, (text, err[-2000:])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    texts = d / "texts.jsonl"
    with texts.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"id": f"t{i}", "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(36))}) + "\n")
    cal = d / "cal.json"
    out = _cli("calibrate", "--model", "tiny", "--texts", texts, "--out", cal, "--risk-model", "none",
               "--drift-every", "0", "--far", "0.1")
    assert out.returncode == 0, out.stderr[-3000:]
    return {"dir": d, "texts": texts, "cal": cal, "doc": json.loads(cal.read_text())}


def _variant(files, name, change):
    doc = json.loads(json.dumps(files["doc"]))
    change(doc["offline"])
    path = files["dir"] / name
    path.write_text(json.dumps(doc))
    return path


def test_calibrate_out_is_a_folder_is_refused_before_the_run_and_leaves_nothing(files, tmp_path):
    target = tmp_path / "outdir"
    target.mkdir()
    out = _cli("calibrate", "--model", "tiny", "--texts", files["texts"], "--out", target, "--risk-model", "none")
    _refused(out, f"--out: {target} is a folder; give a file name")
    assert "text/s" not in out.stderr  # refused before any model ran (no progress bar)
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["outdir"]


def test_calibrate_voters_must_name_detectors_and_are_checked_before_the_run(files, tmp_path):
    out = _cli("calibrate", "--model", "tiny", "--texts", files["texts"], "--out", tmp_path / "c.json",
               "--voters", "token_mahalanobis,gru")
    _refused(out, "--voters: expected 'auto' or comma-separated detectors among", "eigentrack", "'token_mahalanobis,gru'")
    assert "text/s" not in out.stderr and not (tmp_path / "c.json").exists()
    # layer_transition is fitted but cannot vote: `score --engine vllm` and the live tap have no rows for it
    out = _cli("calibrate", "--model", "tiny", "--texts", files["texts"], "--out", tmp_path / "c.json",
               "--voters", "layer_transition,token_probe")
    _refused(out, "layer_transition reads per-token rows", "it cannot vote")
    assert "text/s" not in out.stderr and not (tmp_path / "c.json").exists()


def test_out_under_a_file_is_refused(files):
    out = _cli("calibrate", "--model", "tiny", "--texts", files["texts"], "--out", files["texts"] / "c.json")
    _refused(out, "--out: cannot write", "is a file, not a folder")


@pytest.mark.parametrize("command", ["extract", "train", "score", "shield"])
def test_other_commands_refuse_a_folder_as_out(files, tmp_path, command):
    args = {"extract": ["extract", "--model", "tiny", "--texts", files["texts"], "--label", "0"],
            "train": ["train", "--data", files["texts"]],
            "score": ["score", "--model", "tiny", "--calibration", files["cal"], "--texts", files["texts"]],
            "shield": ["shield", "fit", "--embeddings", tmp_path / "x.npy"]}[command]
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((40, 8)))
    _refused(_cli(*args, "--out", tmp_path), f"--out: {tmp_path} is a folder")


def test_score_calibration_missing_a_section_names_it(files, tmp_path):
    cal = _variant(files, "no_combined.json", lambda off: off.pop("combined"))
    out = _cli("score", "--model", "tiny", "--calibration", cal, "--texts", files["texts"], "--out", tmp_path / "s.jsonl")
    _refused(out, f"--calibration: {cal}: offline.combined is missing", absent=("KeyError",))


def test_score_calibration_detector_missing_a_field_names_it(files, tmp_path):
    name = next(iter(files["doc"]["offline"]["detectors"]))
    cal = _variant(files, "bad_det.json", lambda off: off["detectors"].__setitem__(name, {}))
    out = _cli("score", "--model", "tiny", "--calibration", cal, "--texts", files["texts"], "--out", tmp_path / "s.jsonl")
    _refused(out, f"offline.detectors.{name}:", "is missing", absent=("KeyError",))


def test_score_non_numeric_window_names_the_field(files, tmp_path):
    cal = _variant(files, "bad_window.json", lambda off: off.__setitem__("window", "abc"))
    out = _cli("score", "--model", "tiny", "--calibration", cal, "--texts", files["texts"], "--out", tmp_path / "s.jsonl")
    _refused(out, "offline.window: expected an integer >= 2, got 'abc'", absent=("ValueError", "invalid literal"))


def test_score_layer_out_of_range_is_reported_from_the_calibration(files, tmp_path):
    cal = _variant(files, "bad_layers.json", lambda off: off.__setitem__("layers", [1, 99]))
    out = _cli("score", "--model", "tiny", "--calibration", cal, "--texts", files["texts"], "--out", tmp_path / "s.jsonl")
    _refused(out, f"--calibration: {cal}: offline.layers: layer 99 is out of range for a model with 4 layers",
             absent=("EIGENWATCH_LAYERS", "--layers"))


def test_calibrate_layer_out_of_range_is_reported_from_the_flag(files, tmp_path):
    out = _cli("calibrate", "--model", "tiny", "--texts", files["texts"], "--out", tmp_path / "c.json",
               "--layers", "1,99", "--risk-model", "none")
    _refused(out, "--layers: layer 99 is out of range for a model with 4 layers (accepted: -4..3)",
             absent=("EIGENWATCH_LAYERS",))


@pytest.mark.parametrize("value", ["-5", "0", "many"])
def test_max_length_must_be_a_positive_integer(files, tmp_path, value):
    out = _cli("calibrate", "--model", "tiny", "--texts", files["texts"], "--out", tmp_path / "c.json",
               "--max-length", value)
    _refused(out, "--max-length: expected an integer >= 1")


@pytest.mark.parametrize("listen,expect", [
    ("nonsense", "--listen nonsense: expected host:port"),
    ("127.0.0.1:abc", "--listen 127.0.0.1:abc: expected host:port"),
    ("0.0.0.0:0", "--allow-insecure-listen"),
])
def test_sidecar_listen_errors(listen, expect):
    _refused(_cli("sidecar", "--listen", listen, "--metrics-port", "-1"), expect)
