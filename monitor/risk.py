"""The EigenTrack risk model at serving time: numpy + onnxruntime, no torch.

Loads the single-step ONNX graph written by `eigenwatch train`
(monitor/train.py) and runs it frame by frame: the caller keeps the GRU state
h [B, H] per request (zeros before the first frame) and feeds x_t [B, F], the
concatenated descriptors of the monitored layers (monitor/sequences.py). The
session is pinned to one intra-op and one inter-op thread without spinning:
the sidecar shares its host with the vLLM server and must not take its cores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

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
