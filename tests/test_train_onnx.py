"""`eigenwatch train`, the single-step ONNX export and the torch-free runner
(monitor/offline/train.py, monitor/eigentrack.py): real torch, real onnxruntime, no mocks.

- the ONNX step loop reproduces the torch GRU over whole sequences (awkward
  lengths, batches whose rows must stay independent);
- the printed AUROC is honest: high on a learnable synthetic task, ~0.5 on
  labels drawn independently of x (where the train AUROC is still ~1);
- `eigenwatch extract` -> `eigenwatch train` -> RiskModel.load end to end on the tiny model;
- bad sequence files, one-label data, non-eigenwatch ONNX files and wrong widths fail with
  messages that name the file, line, flag or argument;
- the runner never imports torch.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
from eigenwatch.monitor.cli.main import main as cli_main
from eigenwatch.monitor.eigentrack import RiskModel, RiskModelError
from eigenwatch.monitor.offline.sequences import Sequences, sequence_line
from eigenwatch.monitor.offline.train import (
    FORMAT,
    TrainError,
    export_onnx,
    model_meta,
    torch_sequence_risk,
    train_model,
)

LAYERS = (1, 2)
F = len(LAYERS) * len(DESCRIPTOR_NAMES)  # 46
PARITY_ATOL = 1e-5


def synthetic(n: int, seed: int, informative: bool = True, t_range=(4, 30)) -> Sequences:
    """n sequences [T, F] of positive log-normal "descriptors" with decades of spread, 6 signed
    heavy-tailed (Cauchy) noise features and a couple of constant ones. Label 1 multiplies
    features 0..2 by e^0.8 (a shift in log space, like a scaled spectrum); with
    informative=False the labels are drawn independently of x."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    log_scale = rng.uniform(-6, 6, F)  # per-feature scale 1e-3..1e3, shared by all sequences
    xs = []
    for y in labels:
        t = int(rng.integers(*t_range))
        x = np.exp(rng.normal(0.0, 1.0, (t, F)) + log_scale)
        if informative:
            x[:, :3] *= np.exp(0.8 * y)
        x[:, 3:9] = rng.standard_cauchy((t, 6)) * 50.0
        x[:, 9] = 16.0  # like "window": constant in training
        xs.append(x)
    if not informative:
        labels = rng.permutation(labels)
    return Sequences([f"s{i}" for i in range(n)], labels.astype(np.int64), xs, "synthetic", LAYERS,
                     DESCRIPTOR_NAMES)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A briefly trained model and its ONNX export (parity does not need a good model)."""
    seqs = synthetic(48, seed=5)
    net, info = train_model(seqs, hidden=8, epochs=3, seed=3, val_fraction=0.25, progress=False)
    path = tmp_path_factory.mktemp("risk") / "small.onnx"
    export_onnx(net, path, model_meta(seqs, info))
    return net, info, seqs, path


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_onnx_sequence_matches_torch(small):
    net, _, _, path = small
    model = RiskModel.load(path)
    rng = np.random.default_rng(11)
    errs = {}
    for t in (1, 7, 33):
        x = np.exp(rng.normal(0, 2, (t, F))) * rng.choice([-1.0, 1.0], (t, F))
        x[0, 4] = np.nan  # non-finite -> 0 in both paths
        x[-1, 5] = np.inf
        want = torch_sequence_risk(net, x)
        got = model.sequence(x)
        assert got.shape == (t,) and got.dtype == np.float64
        assert np.all((got > 0) & (got < 1))
        errs[t] = _max_err(got, want)
    print(f"\nONNX vs torch max |risk| error by T: {errs}")
    assert max(errs.values()) <= PARITY_ATOL, errs


def test_batch_rows_are_independent(small):
    net, _, _, path = small
    model = RiskModel.load(path)
    rng = np.random.default_rng(12)
    lengths = (1, 7, 33, 2, 12)
    xs = [np.exp(rng.normal(0, 2, (t, F))) for t in lengths]
    batched = model.sequences(xs)  # batch 5 while all are live, shrinking as they finish
    for x, risk in zip(xs, batched):
        assert risk.shape == (len(x),)
        assert _max_err(risk, torch_sequence_risk(net, x)) <= PARITY_ATOL
        assert _max_err(risk, model.sequence(x)) <= PARITY_ATOL

    # One step with B = 5 equals five steps with B = 1, for any mix of states.
    x = np.stack([v[0] for v in xs])
    h = rng.uniform(-1, 1, (5, model.hidden_size)).astype(np.float32)
    risk5, h5 = model.step(x, h)
    assert risk5.shape == (5,) and h5.shape == (5, model.hidden_size) and h5.dtype == np.float32
    for i in range(5):
        r1, h1 = model.step(x[i:i + 1], h[i:i + 1])
        assert abs(r1[0] - risk5[i]) <= PARITY_ATOL and _max_err(h1[0], h5[i]) <= PARITY_ATOL
    # h=None starts from the zero state, like the first frame of a request.
    r_none, _ = model.step(x)
    r_zero, _ = model.step(x, model.initial_state(5))
    assert np.array_equal(r_none, r_zero)


def test_metadata_and_io(small):
    _, info, seqs, path = small
    model = RiskModel.load(path)
    assert model.meta["eigenwatch.format"] == FORMAT
    assert model.model == "synthetic" and model.layers == LAYERS
    assert model.descriptor_names == tuple(DESCRIPTOR_NAMES)
    assert model.hidden_size == 8 and model.feature_dim == F
    assert int(model.meta["n_train"]) == info["n_train"] and int(model.meta["n_val"]) == info["n_val"]
    assert info["n_train"] + info["n_stop"] + info["n_val"] == len(seqs.ids) and info["n_val"] == 12
    assert int(model.meta["seed"]) == 3
    assert float(model.meta["val_auroc"]) == pytest.approx(info["val_auroc"])
    assert len(model.sha256) == 64
    assert model.initial_state(3).shape == (3, 8)


def test_training_is_deterministic(small):
    net, info, seqs, _ = small
    net2, info2 = train_model(seqs, hidden=8, epochs=3, seed=3, val_fraction=0.25, progress=False)
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert np.array_equal(a.numpy(), b.numpy()), k
    assert info2["val_ids"] == info["val_ids"]


def test_auroc_is_honest_and_early_stopping_stops_memorising():
    """Learnable labels: validation AUROC > 0.9 (with early stopping, the default).
    Labels independent of x: run for every epoch, the model fits its training split
    but the held-out AUROC stays near chance; with early stopping it stops soon and
    memorises far less."""
    good, good_info = train_model(synthetic(260, seed=1), hidden=16, epochs=40, seed=0, progress=False)
    noise = synthetic(260, seed=2, informative=False)
    _, rand_info = train_model(noise, hidden=16, epochs=40, seed=0, progress=False, stop_fraction=0.0)
    _, rand_es = train_model(noise, hidden=16, epochs=40, seed=0, progress=False)
    print(f"\nlearnable: train AUROC {good_info['train_auroc']:.3f} val {good_info['val_auroc']:.3f} "
          f"(kept epoch {good_info['best_epoch']}); random labels, all epochs: train {rand_info['train_auroc']:.3f} "
          f"val {rand_info['val_auroc']:.3f}; early stopping: kept epoch {rand_es['best_epoch']} of "
          f"{rand_es['epochs_run']}, train {rand_es['train_auroc']:.3f} val {rand_es['val_auroc']:.3f}")
    assert good_info["val_auroc"] > 0.9 and good_info["n_stop"] > 0
    assert abs(rand_info["val_auroc"] - 0.5) < 0.2  # n_val = 52: null s.d. of AUROC ~ 0.08
    assert rand_info["train_auroc"] > 0.8  # it memorised noise: only the held-out number tells
    assert rand_info["n_stop"] == 0 and rand_info["epochs_run"] == 40
    assert abs(rand_es["val_auroc"] - 0.5) < 0.2
    assert rand_es["epochs_run"] < 40 and rand_es["train_auroc"] < rand_info["train_auroc"] - 0.1


# ---------------------------------------------------------------- end to end with the tiny model

SENTENCES = [
    "The morning train was late again, so most of the passengers waited on the platform with coffee "
    "and talked quietly about the weather and their plans for the long weekend ahead.",
    "My grandmother keeps a small garden behind her house where she grows tomatoes, beans and "
    "a few rows of sunflowers that the birds visit every single afternoon in the summer.",
    "After the meeting ended, the team walked down to the river and shared sandwiches while "
    "they argued in a friendly way about which project deserved the most attention next month.",
    "The library on the corner opens at nine, and on Saturdays it fills with children who come "
    "to hear stories read aloud by volunteers from the neighbourhood school and the church.",
    "We drove along the coast for hours, stopping at small villages to buy bread and fruit, and "
    "watched the sun go down over the water before finding a quiet place to stay for the night.",
    "Learning to play the piano takes patience, because the hands must practise the same short "
    "passages many times before the music begins to sound smooth, natural and truly expressive.",
    "The old bridge over the valley was repaired last year, and now people cross it on foot "
    "and by bicycle to reach the market that opens in the square every Thursday morning.",
    "When the storm finally passed, the neighbours came outside to clear the branches from the "
    "road and to check that everyone on the street was safe, dry and had enough food at home.",
]


def scramble(text: str, rng: random.Random) -> str:
    """The same characters in random order, spaces kept where they were: gibberish of equal length."""
    chars = [c for c in text if c != " "]
    rng.shuffle(chars)
    it = iter(chars)
    return "".join(" " if c == " " else next(it) for c in text)


def _texts(path, texts, prefix):
    with open(path, "w") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n")
    return str(path)


def test_extract_train_load_end_to_end(tmp_path, capsys):
    rng = random.Random(0)
    ordinary = _texts(tmp_path / "ordinary.jsonl", SENTENCES, "ok-")
    shifted = _texts(tmp_path / "scrambled.jsonl", [scramble(t, rng) for t in SENTENCES], "bad-")
    seq0, seq1, out = tmp_path / "ok.seq.jsonl", tmp_path / "bad.seq.jsonl", tmp_path / "model" / "risk.onnx"
    assert cli_main(["extract", "--model", "tiny", "--texts", ordinary, "--label", "0", "--out", str(seq0)]) == 0
    assert cli_main(["extract", "--model", "tiny", "--texts", shifted, "--label", "1", "--out", str(seq1)]) == 0
    capsys.readouterr()
    rc = cli_main(["train", "--data", str(seq0), str(seq1), "--out", str(out), "--hidden", "8",
                   "--epochs", "5", "--seed", "1", "--val-fraction", "0.25"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "train AUROC" in printed.out and "validation AUROC" in printed.out and str(out) in printed.out

    line = json.loads(seq0.read_text().splitlines()[0])
    model = RiskModel.load(out)
    assert model.model == "tiny" == line["model"]
    assert model.layers == tuple(line["layers"])
    assert model.descriptor_names == tuple(DESCRIPTOR_NAMES) == tuple(line["descriptor_names"])
    assert model.feature_dim == len(line["layers"]) * len(DESCRIPTOR_NAMES) and model.hidden_size == 8
    assert int(model.meta["n_train"]) + int(model.meta["n_stop"]) + int(model.meta["n_val"]) == 2 * len(SENTENCES)
    assert int(model.meta["n_val"]) == 4  # 25 % of each label
    risk = model.sequence(np.asarray(line["x"]))
    assert risk.shape == (len(line["token_counts"]),) and np.all((risk > 0) & (risk < 1))
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temp file


# ---------------------------------------------------------------- bad input

def _seq_file(path, rows):
    """rows: (label, layers) per line, 3 steps of small positive x each."""
    names = list(DESCRIPTOR_NAMES)
    with open(path, "w") as fh:
        for i, (label, layers) in enumerate(rows):
            x = np.full((3, len(layers) * len(names)), 0.5 + i)
            fh.write(sequence_line(f"r{i}", label, "tiny", layers, names, [16, 32, 48], x) + "\n")
    return path


def _train(capsys, *data, out):
    rc = cli_main(["train", "--data", *map(str, data), "--out", str(out), "--epochs", "1"])
    return rc, capsys.readouterr().err


def test_bad_sequence_files_name_file_and_line(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    bad_label = tmp_path / "label.jsonl"
    _seq_file(bad_label, [(0, [1, 2]), (1, [1, 2])])
    lines = bad_label.read_text().splitlines()
    lines[1] = lines[1].replace('"label": 1', '"label": 2')
    bad_label.write_text("\n".join(lines) + "\n")
    rc, err = _train(capsys, bad_label, out=out)
    assert rc == 2 and f"{bad_label}:2" in err and "label" in err and "got 2" in err
    assert "Traceback" not in err

    layers = _seq_file(tmp_path / "layers.jsonl", [(0, [1, 2]), (1, [1, 3])])
    rc, err = _train(capsys, layers, out=out)
    assert rc == 2 and f"{layers}:2" in err and "layers" in err

    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(_seq_file(tmp_path / "ok.jsonl", [(0, [1, 2])]).read_text() + "{not json\n")
    rc, err = _train(capsys, malformed, out=out)
    assert rc == 2 and f"{malformed}:2" in err and "JSON" in err

    rc, err = _train(capsys, tmp_path / "missing.jsonl", out=out)
    assert rc == 2 and "--data" in err and "missing.jsonl" in err
    assert not out.exists()


def test_one_label_and_bad_flags(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    only0 = _seq_file(tmp_path / "only0.jsonl", [(0, [1, 2])] * 4)
    rc, err = _train(capsys, only0, out=out)
    assert rc == 2 and "--data" in err and "label 0" in err and "--label 1" in err
    with pytest.raises(TrainError, match="--data"):
        seqs = synthetic(6, seed=0)
        seqs.labels[:] = 1
        train_model(seqs, epochs=1, progress=False)

    both = _seq_file(tmp_path / "both.jsonl", [(0, [1, 2]), (1, [1, 2])] * 3)
    for flag, value, words in (("--val-fraction", "1.5", "[0, 1)"), ("--epochs", "0", ">= 1"),
                               ("--hidden", "0", ">= 1"), ("--lr", "-1", "> 0"),
                               ("--stop-fraction", "1", "[0, 1)"), ("--patience", "0", ">= 1")):
        rc = cli_main(["train", "--data", str(both), "--out", str(out), flag, value])
        err = capsys.readouterr().err
        assert rc == 2 and flag in err and words in err and value in err
    assert not out.exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, err = _train(capsys, both, out=blocker / "m.onnx")
    assert rc == 2 and "--out" in err and "Traceback" not in err


def test_load_rejects_foreign_files(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf\n")
    with pytest.raises(RiskModelError, match="not a loadable ONNX model") as e:
        RiskModel.load(junk)
    assert str(junk) in str(e.value) and "eigenwatch train" in str(e.value)

    with pytest.raises(RiskModelError, match="cannot read") as e:
        RiskModel.load(tmp_path / "absent.onnx")
    assert "absent.onnx" in str(e.value)

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["risk"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("risk", TensorProto.FLOAT, ["B", 4])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), plain)
    with pytest.raises(RiskModelError, match="without eigenwatch metadata") as e:
        RiskModel.load(plain)
    assert str(plain) in str(e.value)

    # Right metadata on the wrong graph: the I/O check catches it.
    m = onnx.load(plain)
    helper.set_model_props(m, {"eigenwatch.format": FORMAT, "model": "tiny", "layers": "[1]",
                               "descriptor_names": json.dumps(list(DESCRIPTOR_NAMES)),
                               "hidden_size": "4", "feature_dim": str(len(DESCRIPTOR_NAMES))})
    wrong = tmp_path / "wrong.onnx"
    onnx.save(m, wrong)
    with pytest.raises(RiskModelError, match=r"input 'x' .* expected float32 \[B, 23\]") as e:
        RiskModel.load(wrong)
    assert str(wrong) in str(e.value)


def test_step_rejects_wrong_shapes(small):
    model = RiskModel.load(small[3])
    with pytest.raises(RiskModelError, match=rf"x: expected shape \[batch, {F}\].*got \[2, {F - 1}\]"):
        model.step(np.zeros((2, F - 1)))
    with pytest.raises(RiskModelError, match="x: expected shape"):
        model.step(np.zeros(F))
    with pytest.raises(RiskModelError, match=r"h: expected shape \[2, 8\]"):
        model.step(np.zeros((2, F)), np.zeros((2, 7), np.float32))
    with pytest.raises(RiskModelError, match="sequence 1"):
        model.sequences([np.zeros((3, F)), np.zeros((3, 5))])


def test_runner_never_imports_torch(small):
    code = (
        "import sys, numpy as np\n"
        "from eigenwatch.monitor.eigentrack import RiskModel\n"
        f"m = RiskModel.load({str(small[3])!r})\n"
        "r, h = m.step(np.ones((2, m.feature_dim)), m.initial_state(2))\n"
        "s = m.sequence(np.ones((5, m.feature_dim)))\n"
        "assert r.shape == (2,) and s.shape == (5,)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'onnx', 'onnxscript')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
