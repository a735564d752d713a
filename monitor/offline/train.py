"""`eigenwatch train`: the EigenTrack recurrent risk model, fitted with torch and
exported to ONNX for the sidecar (which runs it with onnxruntime, no torch:
monitor/eigentrack.py).

Retraining on your own data
---------------------------

    eigenwatch extract --model M --texts normal.jsonl  --label 0 --out normal.seq.jsonl
    eigenwatch extract --model M --texts shifted.jsonl --label 1 --out shifted.seq.jsonl
    eigenwatch train --data normal.seq.jsonl shifted.seq.jsonl --out risk.onnx

Label 0 = texts like the traffic the server should see (in-distribution),
label 1 = the shift you want flagged (another domain, corrupted or adversarial
input, prompts that led to hallucinations). Both files must come from the same
model, layers, window and stride as the live tap, because the model reads the
tap's descriptor vectors x_t (monitor/eigentrack.py). The printed validation
AUROC is measured on a held-out, label-stratified split (--val-fraction) that
training never sees and that is not used to pick epochs, so it estimates what
the model does on new texts of the same two kinds — not on shifts it was never
shown. The epoch is picked on another slice, set aside from the training split
(--stop-fraction): the weights with the lowest loss there are kept, and
training ends after --patience epochs without improvement.

Model (one time step = one frame of every monitored layer, x_t of F = L·23)
---------------------------------------------------------------------------

    u_t   = sign(x_t)·log1p(|x_t|)          descriptors span decades (λ1, trace)
    z_t   = (u_t − μ) / max(σ, STD_FLOOR)   μ, σ per feature from the training split
    h_t   = GRU(z_t, h_{t−1}), h_0 = 0      1 layer, hidden H
    logit_t = w·h_t + b,  risk_t = sigmoid(logit_t)

μ and σ are computed in float64 and stored in the model as constants, so the
ONNX graph takes raw descriptors. The floor on σ keeps features that are
constant in training (gamma, window) from turning float noise into huge inputs.
Training applies dropout (INPUT_DROPOUT) to z_t; the exported graph does not.

Loss: binary cross-entropy of *every* step's logit against the sequence label.
The sidecar reads the risk after each frame and alerts on it, so the risk has
to be calibrated on every prefix, not only at the end of a text; a shift like
OOD input is present from the first window, so the sequence label is the right
target for each prefix. Each sequence counts once (its steps are averaged, so
long texts do not dominate) and the two classes count equally (weights
1/(2·n_class)), so an unbalanced data set does not just move the bias.
A text's score for the printed AUROC is the max of its risk over steps (what
an alert on the running risk sees).

The exported ONNX graph is ONE step (inputs x [B, F], h [B, H]; outputs
risk [B], logit [B], h_out [B, H]); the caller carries h between frames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eigenwatch.monitor.combined import auroc
from eigenwatch.monitor.eigentrack import FORMAT

from .sequences import Sequences

STD_FLOOR = 1e-2  # in signed-log1p units: ~1 % relative change of a raw descriptor = 1 s.d.
BATCH_SIZE = 32
GRAD_CLIP = 1.0
# Dropout on the normalised inputs while training (identity in the exported graph). Without it the
# GRU memorises noise features: on synthetic data with 3 informative of 69 features, validation
# AUROC 0.86 without, 0.96-0.97 with 0.1-0.3 (weight decay 0.05 alone did not help).
INPUT_DROPOUT = 0.2
EXPORT_ATOL = 1e-4  # float32 ONNX vs float32 torch on random inputs, checked at export
# Early stopping on a slice of the training split. Measured on MiniLM reference texts vs their
# corruptions (`eigenwatch calibrate`'s recipe, 240 sequences, hidden 32, 3 seeds): validation AUROC
# 0.646 after 5 epochs, 0.622 after 10, 0.586 after 20, 0.536 after 60, 0.456 after 150 — past a
# few epochs the GRU memorises its training texts, so the epoch is picked on data it does not fit.
STOP_FRACTION = 0.2
PATIENCE = 8
MIN_PER_CLASS_FOR_STOP = 5  # training sequences of each label needed to set some aside


class TrainError(ValueError):
    """Training data or arguments that cannot produce a model; the message names the flag."""


def signed_log1p(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


class RiskNet(nn.Module):
    """Normalisation + 1-layer GRU + linear head. forward: x [B, T, F] -> logits [B, T]."""

    def __init__(self, feature_dim: int, hidden: int, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.feature_dim, self.hidden = int(feature_dim), int(hidden)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float64), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, np.float64), dtype=torch.float32))
        self.drop = nn.Dropout(INPUT_DROPOUT)
        self.gru = nn.GRU(feature_dim, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., F] raw descriptors
        return (signed_log1p(x) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, F] -> [B, T]
        out, _ = self.gru(self.drop(self.normalise(x)))
        return self.head(out).squeeze(-1)


class RiskStep(nn.Module):
    """One step of a RiskNet, sharing its weights: (x [B, F], h [B, H]) ->
    (risk [B], logit [B], h_out [B, H]). The GRU cell is written out (PyTorch's
    gate order r, z, n) so the ONNX graph is plain MatMul/Sigmoid/Tanh and any
    runtime executes it; the parity test checks it against nn.GRU."""

    def __init__(self, net: RiskNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, h: torch.Tensor):
        g = self.net.gru
        z_in = self.net.normalise(x)
        gi = z_in @ g.weight_ih_l0.T + g.bias_ih_l0  # [B, 3H]
        gh = h @ g.weight_hh_l0.T + g.bias_hh_l0  # [B, 3H]
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h_out = (1.0 - z) * n + z * h
        logit = self.net.head(h_out).squeeze(-1)
        return torch.sigmoid(logit), logit, h_out


def feature_stats(xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and floored std of signed_log1p over every step of xs (float64): ([F], [F])."""
    u = np.concatenate([np.sign(x) * np.log1p(np.abs(x)) for x in xs], axis=0)  # [sum T, F]
    return u.mean(axis=0), np.maximum(u.std(axis=0), STD_FLOOR)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Label-stratified split fixed by seed: (train idx, val idx). Each class keeps >= 1 training sequence."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(int(round(val_fraction * len(idx))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _pad(xs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch: (x [B, Tmax, F] float32, mask [B, Tmax] float32). The GRU is
    causal, so padding after a sequence's end never changes its valid steps."""
    t_max = max(len(x) for x in xs)
    out = np.zeros((len(xs), t_max, xs[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(xs), t_max), dtype=np.float32)
    for i, x in enumerate(xs):
        out[i, :len(x)] = x
        mask[i, :len(x)] = 1.0
    return torch.from_numpy(out), torch.from_numpy(mask)


def _sequence_scores(net: RiskNet, xs: list[np.ndarray]) -> np.ndarray:
    """Per-sequence score = max over steps of the risk: [N] float64."""
    scores = []
    with torch.no_grad():
        for i in range(0, len(xs), 256):
            x, mask = _pad(xs[i:i + 256])
            risk = torch.sigmoid(net(x)).double()
            risk = torch.where(mask > 0, risk, torch.full_like(risk, -1.0))
            scores.append(risk.max(dim=1).values.numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def _auroc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    if not (labels == 0).any() or not (labels == 1).any():
        return float("nan")
    return auroc(scores[labels == 0], scores[labels == 1])


def check_args(hidden: int, epochs: int, lr: float, val_fraction: float, stop_fraction: float = 0.0,
               patience: int = 1) -> None:
    if not 0 <= stop_fraction < 1:
        raise TrainError(f"--stop-fraction: expected a number in [0, 1), got {stop_fraction}")
    if patience < 1:
        raise TrainError(f"--patience: expected an integer >= 1, got {patience}")
    if hidden < 1:
        raise TrainError(f"--hidden: expected an integer >= 1, got {hidden}")
    if epochs < 1:
        raise TrainError(f"--epochs: expected an integer >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise TrainError(f"--lr: expected a number > 0, got {lr}")
    if not 0 <= val_fraction < 1:
        raise TrainError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")


def _weights(y: np.ndarray) -> np.ndarray:
    """Each class weighs 1/2 in total, each sequence equally inside its class (see module docstring)."""
    return np.where(y == 1, 0.5 / max((y == 1).sum(), 1), 0.5 / max((y == 0).sum(), 1))


def _loss(net: RiskNet, xs: list[np.ndarray], y: np.ndarray, w: np.ndarray) -> float:
    """The training loss on fixed sequences, without gradients (the early-stopping criterion)."""
    bce = nn.BCEWithLogitsLoss(reduction="none")
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(xs), 256):
            x, mask = _pad(xs[b:b + 256])
            yy = torch.as_tensor(y[b:b + 256], dtype=torch.float32)[:, None].expand_as(mask)
            per_seq = (bce(net(x), yy) * mask).sum(dim=1) / mask.sum(dim=1)
            total += float((torch.as_tensor(w[b:b + 256], dtype=torch.float32) * per_seq).sum())
    return total / float(w.sum())


def train_model(seqs: Sequences, hidden: int = 32, epochs: int = 60, lr: float = 3e-3, seed: int = 0,
                val_fraction: float = 0.2, progress: bool = True, stop_fraction: float = STOP_FRACTION,
                patience: int = PATIENCE) -> tuple[RiskNet, dict]:
    """Fit a RiskNet on seqs (xs: N × [T_i, F], labels [N] in {0, 1}). Deterministic given seed.

    Early stopping: `stop_fraction` of the training split (label-stratified) is
    set aside; after each epoch the loss on it is measured, the weights of the
    best epoch are kept, and training ends after `patience` epochs without a
    better one (`epochs` is the most it runs). The validation split is never
    touched, so its AUROC stays an honest estimate. With fewer than
    MIN_PER_CLASS_FOR_STOP training sequences of either label, or
    stop_fraction 0, every epoch runs and the last weights are kept.

    Returns (net in eval mode, info) with info: n_train, n_stop, n_val, train_auroc,
    val_auroc (nan when the validation split lacks a label), final_loss (training
    loss of the kept epoch), best_epoch, epochs_run, seconds, seed, hidden, epochs."""
    import copy

    from tqdm import tqdm

    check_args(hidden, epochs, lr, val_fraction, stop_fraction, patience)
    labels = np.asarray(seqs.labels, dtype=np.int64)
    counts = {c: int((labels == c).sum()) for c in (0, 1)}
    if counts[0] == 0 or counts[1] == 0:
        have = 0 if counts[0] else 1
        raise TrainError(f"--data: all {len(labels)} sequence(s) have label {have}; training needs both labels: "
                         "extract in-distribution texts with `eigenwatch extract --label 0` and shifted texts "
                         "with `--label 1`, and pass both files to --data")
    tr, va = split_indices(labels, val_fraction, seed)
    st = np.zeros(0, dtype=np.int64)
    if stop_fraction > 0 and min((labels[tr] == c).sum() for c in (0, 1)) >= MIN_PER_CLASS_FOR_STOP:
        keep, stop = split_indices(labels[tr], stop_fraction, seed + 1)
        tr, st = tr[keep], tr[stop]
    xs_tr = [seqs.xs[i] for i in tr]
    y_tr = labels[tr]
    mean, std = feature_stats(xs_tr)
    w_tr = _weights(y_tr)  # [N_train]
    xs_st, y_st = [seqs.xs[i] for i in st], labels[st]
    w_st = _weights(y_st)

    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # A GRU this small gains nothing from intra-op threads, and on a loaded host OpenMP threads
    # that wait for each other are ~10x slower (measured: 0.23 vs 2.4 s/epoch on 2 busy cores).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        net = RiskNet(len(mean), hidden, mean, std)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        bce = nn.BCEWithLogitsLoss(reduction="none")
        final_loss = float("nan")
        best = (float("inf"), 0, None, float("nan"))  # (stop loss, epoch, weights, train loss)
        epochs_run = 0
        bar = tqdm(range(epochs), desc="train", unit="epoch", file=sys.stderr, disable=not progress)
        for epoch in bar:
            net.train()
            order = torch.randperm(len(xs_tr), generator=gen).numpy()
            total, weight = 0.0, 0.0
            for b in range(0, len(order), BATCH_SIZE):
                idx = order[b:b + BATCH_SIZE]
                x, mask = _pad([xs_tr[i] for i in idx])  # [b, T, F], [b, T]
                y = torch.as_tensor(y_tr[idx], dtype=torch.float32)[:, None].expand_as(mask)
                w = torch.as_tensor(w_tr[idx], dtype=torch.float32)  # [b]
                per_step = bce(net(x), y) * mask  # [b, T]
                per_seq = per_step.sum(dim=1) / mask.sum(dim=1)  # [b]
                loss = (w * per_seq).sum() / w.sum()
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
                opt.step()
                total += loss.item() * float(w.sum())
                weight += float(w.sum())
            final_loss = total / weight
            epochs_run = epoch + 1
            if not len(st):
                bar.set_postfix(loss=f"{final_loss:.4f}")
                continue
            net.eval()
            stop_loss = _loss(net, xs_st, y_st, w_st)
            bar.set_postfix(loss=f"{final_loss:.4f}", stop=f"{stop_loss:.4f}")
            if stop_loss < best[0]:
                best = (stop_loss, epoch + 1, copy.deepcopy(net.state_dict()), final_loss)
            elif epoch + 1 - best[1] >= patience:
                break
        bar.close()
        if best[2] is not None:
            net.load_state_dict(best[2])
            final_loss = best[3]
        net.eval()
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)

    train_auroc = _auroc_or_nan(y_tr, _sequence_scores(net, xs_tr))
    val_auroc = _auroc_or_nan(labels[va], _sequence_scores(net, [seqs.xs[i] for i in va]))
    info = {"n_train": int(len(tr)), "n_stop": int(len(st)), "n_val": int(len(va)), "train_auroc": train_auroc,
            "val_auroc": val_auroc, "final_loss": final_loss, "best_epoch": int(best[1] or epochs_run),
            "epochs_run": int(epochs_run), "seconds": time.perf_counter() - t0, "seed": int(seed),
            "hidden": int(hidden), "epochs": int(epochs), "lr": float(lr), "val_fraction": float(val_fraction),
            "val_ids": [seqs.ids[i] for i in va]}
    return net, info


def torch_sequence_risk(module: RiskNet, x: np.ndarray) -> np.ndarray:
    """Risk after every step of one sequence with the torch model: x [T, F] -> [T] float64."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    module.eval()  # the risk is defined without dropout, as in the exported graph
    with torch.no_grad():
        logits = module(torch.as_tensor(x, dtype=torch.float32)[None])  # [1, T]
    return torch.sigmoid(logits[0]).double().numpy()


def _meta_value(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    if isinstance(v, float):
        return repr(float(v))  # "nan" when undefined; float() reads it back
    return str(v)


@contextlib.contextmanager
def _quiet_exporter():
    """The torch.export-based ONNX exporter logs that torchvision ops are not registered and
    emits torch-internal warnings; none concerns this graph, so keep them off the CLI."""
    # onnxscript/onnx_ir report every optimiser pass at INFO, which the CLI's logging shows.
    logs = {name: logging.getLogger(name) for name in
            ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")}
    levels = {name: log.level for name, log in logs.items()}
    for log in logs.values():
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # x and h share one batch axis; the exporter notes that it merged the two names.
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used", category=UserWarning)
            yield
    finally:
        for name, log in logs.items():
            log.setLevel(levels[name])


def export_onnx(module: RiskNet, path: str | Path, meta: dict) -> None:
    """Write the single-step graph of `module` to `path` (atomically: temp file, then rename)
    with eigenwatch metadata. meta needs model, layers, descriptor_names; n_train, n_val,
    val_auroc, seed are recorded when given. The graph is checked against torch on random
    inputs with onnxruntime before the file is written."""
    import onnx
    import onnxruntime as ort

    missing = [k for k in ("model", "layers", "descriptor_names") if k not in meta]
    if missing:
        raise ValueError(f"export_onnx: meta lacks {', '.join(missing)}")
    F, H = module.feature_dim, module.hidden
    if len(meta["layers"]) * len(meta["descriptor_names"]) != F:
        raise ValueError(f"export_onnx: {len(meta['layers'])} layers × {len(meta['descriptor_names'])} descriptors "
                         f"!= the model's feature_dim {F}")
    step = RiskStep(module).eval()
    rng = np.random.default_rng(0)
    # Heavy-tailed, signed example inputs: the check below must exercise the log1p and the tails.
    x = torch.as_tensor(rng.standard_t(2, size=(3, F)) * 10.0, dtype=torch.float32)
    h = torch.as_tensor(rng.uniform(-1, 1, size=(3, H)), dtype=torch.float32)
    with _quiet_exporter():
        prog = torch.onnx.export(step, (x, h), dynamo=True, verbose=False, opset_version=18,
                                 input_names=["x", "h"], output_names=["risk", "logit", "h_out"],
                                 dynamic_shapes={"x": {0: "batch"}, "h": {0: "batch"}})
    proto = prog.model_proto
    props = {k: _meta_value(v) for k, v in meta.items() if k != "eigenwatch.format"}
    props.update({"eigenwatch.format": FORMAT, "hidden_size": str(H), "feature_dim": str(F)})
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = ("eigenwatch EigenTrack risk model, one step: x [B, F] raw descriptors, h [B, H] state "
                        "(zeros at the first frame) -> risk [B] = sigmoid(logit), logit [B], h_out [B, H]")
    onnx.checker.check_model(proto)
    blob = proto.SerializeToString()

    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = [t.numpy() for t in step(x, h)]
    got = sess.run(["risk", "logit", "h_out"], {"x": x.numpy(), "h": h.numpy()})
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    if not err <= EXPORT_ATOL:
        raise RuntimeError(f"export_onnx: the ONNX graph differs from torch by {err:.3g} (> {EXPORT_ATOL})")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory (so the rename is atomic), a name unique to this process, and open()
    # rather than mkstemp so the file gets the umask's usual mode, not 0600.
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def model_meta(seqs: Sequences, info: dict) -> dict:
    return {"model": seqs.model, "layers": list(seqs.layers), "descriptor_names": list(seqs.descriptor_names),
            "n_train": info["n_train"], "n_stop": info["n_stop"], "n_val": info["n_val"],
            "best_epoch": info["best_epoch"], "val_auroc": float(info["val_auroc"]),
            "seed": info["seed"]}


def _fmt_auroc(v: float, n: int) -> str:
    return f"{v:.4f} (n={n})" if math.isfinite(v) else f"n/a (n={n}: needs both labels)"


def run(args) -> int:
    """`eigenwatch train`: read --data, fit, export --out, print train/validation AUROC."""
    from .sequences import SequenceFileError, read_sequences

    from . import OfflineError, check_out

    try:
        check_out(args.out, example="eigentrack.onnx")  # before training, not after it
    except OfflineError as exc:
        print(f"eigenwatch train: error: {exc}", file=sys.stderr)
        return 2
    try:
        check_args(args.hidden, args.epochs, args.lr, args.val_fraction, args.stop_fraction, args.patience)
        seqs = read_sequences(args.data)
        net, info = train_model(seqs, hidden=args.hidden, epochs=args.epochs, lr=args.lr, seed=args.seed,
                                val_fraction=args.val_fraction, progress=True, stop_fraction=args.stop_fraction,
                                patience=args.patience)
    except (SequenceFileError, TrainError) as exc:
        print(f"eigenwatch train: error: {exc}", file=sys.stderr)
        return 2
    try:
        export_onnx(net, args.out, model_meta(seqs, info))
    except OSError as exc:
        print(f"eigenwatch train: error: --out {args.out!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # onnx / onnxscript / onnxruntime load only for the export
        print(f"eigenwatch train: error: {exc}; install the training extra: pip install 'eigenwatch[train]'",
              file=sys.stderr)
        return 2
    print(f"eigenwatch train: {len(seqs.ids)} sequence(s), model {seqs.model}, layers {list(seqs.layers)}, "
          f"feature_dim {net.feature_dim}, hidden {net.hidden}, {info['epochs_run']} epoch(s) "
          f"in {info['seconds']:.1f}s, kept epoch {info['best_epoch']} (training loss {info['final_loss']:.4f})")
    if info["n_stop"]:
        print(f"  early stopping on {info['n_stop']} training sequence(s) set aside (--stop-fraction)")
    print(f"  train AUROC      {_fmt_auroc(info['train_auroc'], info['n_train'])}")
    print(f"  validation AUROC {_fmt_auroc(info['val_auroc'], info['n_val'])}  (held out, seed {info['seed']})")
    if 0 < info["n_val"] < 20:
        print(f"  note: only {info['n_val']} validation sequence(s): that AUROC is a coarse estimate; "
              "extract more texts for a usable one")
    if info["train_auroc"] - info["val_auroc"] > 0.15:  # false when val is nan
        print("  note: the model fits its training split far better than held-out data (memorising noise); "
              "add sequences or lower --hidden")
    print(f"  wrote {args.out}")
    return 0
