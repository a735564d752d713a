"""EigenTrack: a recurrent risk model over the sequence of a request's window
descriptors, used live (the sidecar's per-step risk, monitor/sidecar/risk.py)
and offline (the `eigentrack` detector of calibrate/score). numpy + onnxruntime,
no torch: `eigenwatch train` (monitor/offline/train.py) fits the GRU with
torch and exports the single-step ONNX graph this module runs.

One time step of a request is the tap's frames of all monitored layers at the
same token count, their descriptor vectors concatenated in ascending layer
order: x_t = [desc(layer_0) | desc(layer_1) | ...], length L·D. Non-finite
descriptor values become 0 in x_t. The caller keeps the GRU state h [B, H]
per request (zeros before the first step). The onnxruntime session is pinned
to one intra-op and one inter-op thread without spinning: the sidecar shares
its host with the vLLM server and must not take its cores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

NAME = "eigentrack"


def step_vector(descs: dict[int, np.ndarray], layers: tuple[int, ...]) -> np.ndarray:
    """x_t from {layer: descriptor vector [D]} for every layer in `layers`: [L·D] float64, finite."""
    return step_matrix([descs], layers)[0]


def step_matrix(descs: list[dict[int, np.ndarray]], layers: tuple[int, ...]) -> np.ndarray:
    """x_t of many steps at once: row b from descs[b] = {layer: descriptor vector [D]} for every
    layer in `layers`: [B, L·D] float64, finite (one stack per layer, not a concatenation per
    step: offline sequences and the live risk's batches both build their steps here)."""
    x = np.concatenate([np.array([d[l] for d in descs], dtype=np.float64) for l in layers], axis=1)
    x[~np.isfinite(x)] = 0.0  # = nan_to_num(nan=0, posinf=0, neginf=0), cheaper on short vectors
    return x


def frames_to_sequence(frames: Iterable, layers: tuple[int, ...]) -> tuple[list[int], np.ndarray]:
    """(token_counts [T], x [T, L·D]) from frames with .layer, .token_count and
    .descriptors. Steps where some layer has no frame are dropped; of several
    frames of one layer at one token count (a final frame repeating the last
    stride frame) the last one counts."""
    by_count: dict[int, dict[int, np.ndarray]] = {}
    for f in frames:
        if f.layer in layers:
            by_count.setdefault(int(f.token_count), {})[int(f.layer)] = np.asarray(f.descriptors)
    counts = [c for c in sorted(by_count) if len(by_count[c]) == len(layers)]
    if not counts:
        return [], np.zeros((0, 0))
    return counts, step_matrix([by_count[c] for c in counts], layers)


FORMAT = "eigenwatch.risk/v1"
_REQUIRED_META = ("eigenwatch.format", "model", "layers", "descriptor_names", "hidden_size", "feature_dim")
_HINT = "train one with `eigenwatch train --data SEQ.jsonl ... --out model.onnx`"


class RiskModelError(ValueError):
    """A risk model file or input that cannot be used; the message names the path or argument."""


class RiskModel:
    """One loaded risk model. Attributes: path, sha256, model, layers, descriptor_names,
    hidden_size, feature_dim (= len(layers)·len(descriptor_names)), meta (all metadata, str -> str)."""

    def __init__(self, path: Path, sha256: str, session: ort.InferenceSession, meta: dict[str, str],
                 model: str, layers: tuple[int, ...], descriptor_names: tuple[str, ...],
                 hidden_size: int, feature_dim: int):
        self.path, self.sha256, self._session, self.meta = path, sha256, session, meta
        self.model, self.layers, self.descriptor_names = model, layers, descriptor_names
        self.hidden_size, self.feature_dim = hidden_size, feature_dim

    @classmethod
    def load(cls, path: str | Path) -> "RiskModel":
        path = Path(path)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise RiskModelError(f"risk model {str(path)!r}: cannot read: {exc.strerror or exc}; {_HINT}") from None
        return cls.from_bytes(blob, path)

    @classmethod
    def from_bytes(cls, blob: bytes, path: str | Path = "<embedded>") -> "RiskModel":
        """The model from the ONNX file's bytes (CALIB.json embeds the one `eigenwatch calibrate` trains)."""
        path = Path(path)
        where = f"risk model {str(path)!r}"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle ORT worker threads otherwise spin-wait on a core between calls.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail, ...)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RiskModelError(f"{where}: not a loadable ONNX model ({first}); {_HINT}") from None

        meta = dict(session.get_modelmeta().custom_metadata_map)
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise RiskModelError(f"{where}: an ONNX model without eigenwatch metadata (missing "
                                 f"{', '.join(missing)}); {_HINT}")
        if meta["eigenwatch.format"] != FORMAT:
            raise RiskModelError(f"{where}: eigenwatch.format is {meta['eigenwatch.format']!r}, this version "
                                 f"reads {FORMAT!r}; {_HINT}")
        try:
            layers = tuple(int(l) for l in json.loads(meta["layers"]))
            names = tuple(str(n) for n in json.loads(meta["descriptor_names"]))
            hidden, feat = int(meta["hidden_size"]), int(meta["feature_dim"])
        except (ValueError, TypeError) as exc:
            raise RiskModelError(f"{where}: malformed eigenwatch metadata ({exc}); {_HINT}") from None
        if feat != len(layers) * len(names) or hidden < 1:
            raise RiskModelError(f"{where}: metadata feature_dim={feat}, hidden_size={hidden} do not fit "
                                 f"{len(layers)} layers × {len(names)} descriptors; {_HINT}")

        def io(args):
            return {a.name: (a.type, list(a.shape)) for a in args}

        # The batch axis is symbolic (a name or None); the other axes must match the metadata.
        want_in = {"x": feat, "h": hidden}
        want_out = {"risk": None, "logit": None, "h_out": hidden}
        for kind, have, want in (("input", io(session.get_inputs()), want_in),
                                 ("output", io(session.get_outputs()), want_out)):
            for name, width in want.items():
                if name not in have:
                    raise RiskModelError(f"{where}: graph has no {kind} {name!r} (has {sorted(have)}); {_HINT}")
                typ, shape = have[name]
                ok = typ == "tensor(float)" and len(shape) == (1 if width is None else 2)
                if ok and width is not None:
                    ok = shape[1] == width
                if not ok:
                    exp = "[B]" if width is None else f"[B, {width}]"
                    raise RiskModelError(f"{where}: {kind} {name!r} is {typ} {shape}, expected float32 {exp}; {_HINT}")
        return cls(path, hashlib.sha256(blob).hexdigest(), session, meta, meta["model"], layers, names,
                   hidden, feat)

    def initial_state(self, batch: int = 1) -> np.ndarray:  # -> h [B, H] float32 zeros
        return np.zeros((int(batch), self.hidden_size), dtype=np.float32)

    def step(self, x, h=None, output: str = "risk") -> tuple[np.ndarray, np.ndarray]:
        """x [B, F] raw descriptors (non-finite -> 0), h [B, H] or None (= zeros) ->
        (risk [B] float64, h_new [B, H] float32). output="logit" returns the
        logit instead of the risk (it does not saturate at 0 or 1 in float32)."""
        if output not in ("risk", "logit"):
            raise RiskModelError(f"output: expected 'risk' or 'logit', got {output!r}")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise RiskModelError(f"x: expected shape [batch, {self.feature_dim}] ({len(self.layers)} layers × "
                                 f"{len(self.descriptor_names)} descriptors of layers {list(self.layers)}), "
                                 f"got {list(x.shape)}")
        x32 = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        if h is None:
            h = self.initial_state(len(x))
        h = np.asarray(h, dtype=np.float32)
        if h.shape != (len(x), self.hidden_size):
            raise RiskModelError(f"h: expected shape [{len(x)}, {self.hidden_size}] (batch of x, hidden_size), "
                                 f"got {list(h.shape)}")
        risk, h_new = self._session.run([output, "h_out"], {"x": x32, "h": np.ascontiguousarray(h)})
        return risk.astype(np.float64), h_new

    def step_with_logit(self, x, h=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`step` giving both outputs of one model call: (risk [B], logit [B] float64, h_new [B, H])."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            return self.step(x, h) + (None,)  # step raises the error that names the shape
        h = self.initial_state(len(x)) if h is None else np.asarray(h, dtype=np.float32)
        if h.shape != (len(x), self.hidden_size):
            return self.step(x, h) + (None,)
        x32 = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        risk, logit, h_new = self._session.run(["risk", "logit", "h_out"], {"x": x32, "h": np.ascontiguousarray(h)})
        return risk.astype(np.float64), logit.astype(np.float64), h_new

    def sequence(self, x) -> np.ndarray:
        """Risk after every step of one sequence: x [T, F] -> [T] float64."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise RiskModelError(f"x: expected shape [steps, {self.feature_dim}], got {list(x.shape)}")
        return self.sequences([x])[0]

    def sequences(self, xs, output: str = "risk") -> list[np.ndarray]:
        """Risk (or logit) after every step of several sequences, run as one batch per
        step: N × [T_i, F] -> N × [T_i] float64. Finished sequences leave the batch."""
        xs = [np.asarray(x, dtype=np.float64) for x in xs]
        for i, x in enumerate(xs):
            if x.ndim != 2 or x.shape[1] != self.feature_dim:
                raise RiskModelError(f"sequence {i}: expected shape [steps, {self.feature_dim}], got {list(x.shape)}")
        out = [np.zeros(len(x)) for x in xs]
        h = self.initial_state(len(xs))  # [N, H]
        for t in range(max((len(x) for x in xs), default=0)):
            live = np.array([i for i, x in enumerate(xs) if len(x) > t])
            # GRU rows are independent, so running only the live rows leaves the others' h untouched.
            risk, h[live] = self.step(np.stack([xs[i][t] for i in live]), h[live], output)
            for j, i in enumerate(live):
                out[i][t] = risk[j]
        return out


class EigenTrack:
    """The recurrent risk model over descriptor sequences (an ONNX GRU, run
    with onnxruntime: RiskModel above). Score of a text = the largest logit over
    its steps (the live sidecar alerts on the same per-step risk = sigmoid(logit);
    the logit does not saturate in float32). The model is trained by `eigenwatch
    calibrate` (reference texts vs corrupted copies, monitor/offline/texts.py) or by
    `eigenwatch train`, and travels inside CALIB.json as base64."""

    name = NAME

    def __init__(self, risk=None, blob: bytes | None = None):
        self.risk, self.blob = risk, blob

    @classmethod
    def from_onnx(cls, blob: bytes, where: str = "<embedded>") -> "EigenTrack":
        return cls(RiskModel.from_bytes(blob, where), blob)

    def fit(self, feats: list[dict]) -> "EigenTrack":
        return self  # trained separately (it needs positives); see monitor/offline/train.py

    def step_risks(self, feats: list[dict]) -> list[np.ndarray]:
        """Per-step risk of each text: N × [T_i]."""
        return self.risk.sequences([f["sequence"] for f in feats])

    def score(self, feats: list[dict]) -> np.ndarray:
        logits = self.risk.sequences([f["sequence"] for f in feats], output="logit")
        return np.array([float(l.max()) if len(l) else 0.0 for l in logits])

    def state(self) -> dict:
        import base64

        return {"onnx_base64": base64.b64encode(self.blob).decode("ascii"), "sha256": self.risk.sha256,
                "model": self.risk.model, "layers": list(self.risk.layers)}

    @classmethod
    def from_state(cls, st: dict) -> "EigenTrack":
        import base64

        return cls.from_onnx(base64.b64decode(st["onnx_base64"]), "CALIB.json offline.detectors.eigentrack")
