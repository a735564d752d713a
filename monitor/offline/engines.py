"""The engines that run a model over texts for the offline commands:
transformers (`--engine hf`, default) or vLLM itself (`--engine vllm`), both
with the same tap (hooks/windows.py) and the same token sums
(hooks/capture.py), so both give a text the same frames and sums.

An engine is opened once per command and `run` as often as needed. `run`
yields, per text, (id, frames, sums): the tap's frames (hooks.frames.Frame)
and {layer: (n, Σx, XᵀX)}, or None and the reason the text failed.

`vllm`: one in-process vLLM engine (float32, prefix caching off so every
prompt row is computed and seen; hooks/_vllm_engine.py) with the tap enabled.
Its exporter streams frames over real gRPC to a real sidecar started in this
process (monitor/sidecar/server.py), whose frame sink collects them; generate
models run prefill only (one sampled token, whose row is never computed),
pooling models one pooling pass. Texts go in as token ids from the same
tokenizer and truncation rule, so both engines see identical tokens.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import OfflineError, log

ENGINES = ("hf", "vllm")
PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 éß中文 <|probe|>"
BATCH = 64  # texts per vLLM call: bounds the tap's per-request state and what waits here
FRAME_TIMEOUT_S = 60.0  # for the exporter to deliver a batch's last frames


@dataclass
class Tap:
    """The tap settings of an offline run (`calibrate` records them; `score` reuses them)."""

    layers: tuple[int, ...] | None = None  # None: three spread over depth
    window: int = 32
    stride: int = 16
    proj_dim: int = 0  # 0: no random projection
    source: str = "--layers"  # where `layers` came from, for the error that rejects one

    def check(self) -> None:
        if self.window < 2:
            raise OfflineError(f"--window: expected an integer >= 2, got {self.window}")
        if self.stride < 1:
            raise OfflineError(f"--stride: expected an integer >= 1, got {self.stride}")
        if self.proj_dim < 0:
            raise OfflineError(f"--proj-dim: expected an integer >= 0 (0: off), got {self.proj_dim}")


@dataclass
class ModelInfo:
    tokenizer: object
    config: object
    key: str  # the model name in CALIB.json and on frames: "tiny"/"minilm" or the directory name
    path: Path
    runner: str  # "generate" or "pooling"
    max_positions: int | None


def model_key(name: str, path: Path) -> str:
    from eigenwatch.hooks.models import MODEL_ALIASES

    return name if name in MODEL_ALIASES else Path(path).resolve().name


def max_positions(cfg, tok, path: Path | None = None) -> int | None:
    """The longest input the model takes: its position table, or the tokenizer's limit if smaller,
    or a sentence-transformers model's max_seq_length (sentence_bert_config.json) if smaller still:
    vLLM serves such a model at that length (MiniLM: 256 of its 512 positions), so the offline
    engines truncate there too and score what the live server sees."""
    maxpos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    tmax = getattr(tok, "model_max_length", None)
    if isinstance(tmax, int) and tmax < 10**7:
        maxpos = min(maxpos, tmax) if maxpos else tmax
    st_file = Path(path) / "sentence_bert_config.json" if path is not None else None
    if st_file is not None and st_file.is_file():
        try:
            seq = json.loads(st_file.read_text()).get("max_seq_length")
        except (OSError, ValueError):
            seq = None
        if isinstance(seq, int) and seq > 0:
            maxpos = min(maxpos, seq) if maxpos else seq
    return maxpos


def model_info(name: str) -> ModelInfo:
    """Tokenizer and config of --model (no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    from eigenwatch.hooks.models import resolve_model

    try:
        path, runner = resolve_model(name)
    except (ValueError, RuntimeError) as exc:
        raise OfflineError(str(exc)) from None
    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    return ModelInfo(tok, cfg, model_key(name, path), Path(path), runner, max_positions(cfg, tok, Path(path)))


def fingerprint(info: ModelInfo) -> dict:
    cfg = info.config
    raw = (info.path / "config.json").read_bytes()
    try:
        canon = json.dumps(json.loads(raw), sort_keys=True).encode()
    except ValueError:
        canon = raw
    ids = info.tokenizer(PROBE)["input_ids"][:64]
    return {
        "architecture": (getattr(cfg, "architectures", None) or [getattr(cfg, "model_type", "?")])[0],
        "model_type": getattr(cfg, "model_type", ""),
        "hidden_size": int(getattr(cfg, "hidden_size", 0) or 0),
        "num_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
        "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
        "config_sha256": hashlib.sha256(canon).hexdigest(),
        "tokenizer_probe_sha256": hashlib.sha256(json.dumps(list(map(int, ids))).encode()).hexdigest(),
    }


def num_layers(cfg) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def tapped_layers(info: ModelInfo, tap: Tap) -> tuple[int, ...]:
    from eigenwatch.hooks.config import resolve_layers

    n = num_layers(info.config)
    if n is None:
        raise OfflineError(f"--model: {info.path}/config.json gives no layer count (num_hidden_layers)")
    try:
        return resolve_layers(tuple(tap.layers) if tap.layers else None, n, source=tap.source)
    except ValueError as exc:
        raise OfflineError(str(exc)) from None


def open_engine(kind: str, info: ModelInfo, tap: Tap, batch: int | None = None):
    """batch: texts per forward of the hf engine (default HFEngine.BATCH_TEXTS)."""
    tap.check()
    # numpy's BLAS on one thread: beside torch's own threads, a multi-threaded OpenBLAS
    # spun against them and took 140 ms for one 384 × 384 Cholesky (1.8 ms on one thread,
    # same process, measured here); the per-text linear algebra is small, torch's is not.
    from eigenwatch.monitor.process import limit_blas_threads

    limit_blas_threads(1)
    if kind == "hf":
        return HFEngine(info, tap, batch)
    if kind == "vllm":
        return VllmEngine(info, tap)
    raise OfflineError(f"--engine: expected one of {', '.join(ENGINES)}, got {kind!r}")


class HFEngine:
    """transformers with hooks/hf.py's tap, several texts per forward: texts are
    taken in chunks of CHUNK, sorted by length inside a chunk (little padding),
    cut into batches of at most BATCH_TEXTS texts and BATCH_TOKENS padded
    tokens, and reported back in the order given."""

    CHUNK = 256
    BATCH_TEXTS = 32
    BATCH_TOKENS = 8192  # padded tokens per forward: bounds activation memory (T × d × layers)

    def __init__(self, info: ModelInfo, tap: Tap, batch: int | None = None):
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        from eigenwatch.hooks.hf import HFTap

        self.info = info
        if batch is not None:
            self.BATCH_TEXTS = batch
        layers = tapped_layers(info, tap)  # a bad layer is named by where it came from, before the load
        cls = AutoModel if info.runner == "pooling" else AutoModelForCausalLM
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = cls.from_pretrained(info.path, dtype=torch.float32).to(device).eval()
        try:
            self.tap = HFTap(self.model, layers=layers, window=tap.window, stride=tap.stride,
                             model_name=info.key, proj_dim=tap.proj_dim or None, capture=True,
                             max_batch=self.BATCH_TEXTS)
        except ValueError as exc:
            raise OfflineError(f"--layers: {exc}") from None
        self.layers = self.tap.layers

    def batches(self, chunk: list[tuple[str, list[int]]]) -> list[list[tuple[str, list[int]]]]:
        """A chunk of texts as forward batches: by length, each within both limits, no id twice."""
        out, cur, ids = [], [], set()
        for rid, tok in sorted(chunk, key=lambda t: len(t[1])):
            width = max(len(tok), len(cur[-1][1]) if cur else 0)  # sorted: this text is the longest so far
            if cur and (len(cur) >= self.BATCH_TEXTS or width * (len(cur) + 1) > self.BATCH_TOKENS or rid in ids):
                out.append(cur)
                cur, ids = [], set()
            cur.append((rid, tok))
            ids.add(rid)
        if cur:
            out.append(cur)
        return out

    def run(self, prepared, desc: str = ""):
        from tqdm import tqdm

        prepared = [(rid, list(ids)) for rid, ids in prepared]
        with tqdm(total=len(prepared), desc=desc, unit="text", file=sys.stderr, dynamic_ncols=True) as bar:
            for at in range(0, len(prepared), self.CHUNK):
                chunk = prepared[at: at + self.CHUNK]
                done: dict[int, tuple] = {}
                position = {}
                for i, (rid, _) in enumerate(chunk):
                    position.setdefault(rid, []).append(i)
                for batch in self.batches(chunk):
                    try:
                        results = self.tap.run_batch(batch)
                    except (ValueError, RuntimeError) as exc:  # the forward itself failed: every text of the batch
                        results = [(rid, None, None, str(exc)) for rid, _ in batch]
                    for rid, frames, sums, why in results:
                        i = position[rid].pop(0)
                        done[i] = (rid, None, None, why) if why is not None else (rid, frames, sums, None)
                    bar.update(len(batch))
                for i in range(len(chunk)):
                    yield done[i]

    def start_sketches(self, every: int, sample: int) -> None:
        """Top-direction windows (hooks/sketches.py, the live tap's) over the rows of the next runs."""
        from eigenwatch.hooks.sketches import LayerSketches

        self.tap.sketches = LayerSketches(every, sample)
        self.tap.sketch_windows = []

    def stop_sketches(self) -> list:
        """The windows finished since start_sketches (SketchWindow); sketching stops."""
        out, self.tap.sketch_windows, self.tap.sketches = self.tap.sketch_windows, [], None
        return out

    def close(self) -> None:
        self.tap.close()


class _Collector:
    """The frames a sidecar accepted, by the client's request id (the sidecar's frame sink)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.frames: dict[str, list] = {}
        self.finals: dict[str, set[int]] = {}
        self.received = 0

    def __call__(self, frames) -> None:  # on the sidecar's event loop
        with self.cond:
            for f in frames:
                self.frames.setdefault(f.request_id, []).append(f)
                if f.final:
                    self.finals.setdefault(f.request_id, set()).add(f.layer)
            self.received += len(frames)
            self.cond.notify_all()

    def take(self, rid: str) -> list:
        with self.cond:
            self.finals.pop(rid, None)
            return self.frames.pop(rid, [])


class VllmEngine:
    """vLLM in this process, the tap's frames through a real sidecar (see module doc)."""

    def __init__(self, info: ModelInfo, tap: Tap, *, batch: int = BATCH, frame_timeout_s: float = FRAME_TIMEOUT_S):
        from eigenwatch.monitor.sidecar.config import SidecarConfig
        from eigenwatch.monitor.sidecar.server import Sidecar, SidecarThread

        self.info, self.tap_settings = info, tap
        self.layers = tapped_layers(info, tap)
        self.batch, self.frame_timeout_s = batch, frame_timeout_s
        self.collector = _Collector()
        # Frames only: the sidecar's spike detector learns nothing here that anyone reads.
        cfg = SidecarConfig(listen="127.0.0.1:0", metrics_port=-1, calibration_frames=1 << 30,
                            max_requests=4 * batch, report_history=0)
        self.sidecar = SidecarThread(Sidecar(cfg, frame_sink=self.collector)).start()
        self.engine = None
        self.max_len = 0

    def _start(self, need: int) -> None:
        from eigenwatch.hooks._vllm_engine import Engine, EngineError

        if self.engine is not None:
            log(f"--engine vllm: restarting vLLM for a longer text ({need} positions)")
            self.engine.close()
            self.engine = None
        t = self.tap_settings
        env = {
            "EIGENWATCH_SIDECAR": self.sidecar.sidecar.address,
            "EIGENWATCH_LAYERS": ",".join(str(l) for l in self.layers),
            "EIGENWATCH_WINDOW": str(t.window),
            "EIGENWATCH_STRIDE": str(t.stride),
            "EIGENWATCH_DEFAULT": "on",
            "EIGENWATCH_MODEL_NAME": self.info.key,
            "EIGENWATCH_PROJ_DIM": str(t.proj_dim),
            "EIGENWATCH_MAX_REQUESTS": str(max(512, 4 * self.batch)),
            "EIGENWATCH_QUEUE_BATCHES": "65536",  # offline: never drop for a full queue
        }
        try:
            # enforce_eager: torch.compile's start-up costs more than it saves on a few
            # thousand prompts (the tap also works compiled).
            self.engine = Engine(self.info.path, self.info.runner, tap_env=env, in_process=True, max_model_len=need,
                                 dtype="float32", enable_prefix_caching=False, enforce_eager=True)
        except EngineError as exc:
            raise OfflineError(f"--engine vllm: {exc}") from exc
        self.max_len = need
        st = self.engine.tap_stats()
        if not st.get("installed"):
            raise OfflineError(f"--engine vllm: the eigenwatch tap is not installed in the vLLM worker "
                               f"({st.get('reason', 'is the eigenwatch vLLM plugin registered?')})")
        if tuple(st["layers"]) != self.layers:
            raise OfflineError(f"--layers: vLLM's layer stack gives layers {list(st['layers'])}, "
                               f"expected {list(self.layers)}")
        deadline = time.monotonic() + 30
        while not self.engine.tap_stats().get("connected"):
            if time.monotonic() > deadline:
                raise OfflineError(f"--engine vllm: the tap did not connect to the sidecar at "
                                   f"{self.sidecar.sidecar.address}")
            time.sleep(0.05)
        if not self.engine.set_capture(True):
            raise OfflineError("--engine vllm: the tap's capture mode is unavailable")

    def run(self, prepared, desc: str = ""):
        from tqdm import tqdm

        if not prepared:
            return
        extra = 0 if self.info.runner == "pooling" else 1  # room for the one sampled token
        need = max(len(ids) for _, ids in prepared) + extra
        if need > self.max_len:
            limit = self.info.max_positions
            # A generate model starts with room for texts up to its limit (capped), so later
            # runs rarely restart; a pooling model gets exactly what it needs (vLLM may hold
            # it to a shorter context than the HF config says, e.g. sentence-transformers').
            room = max(need, min(limit + extra, 2048)) if limit and extra else need
            self._start(room)
        bar = tqdm(total=len(prepared), desc=desc, unit="text", file=sys.stderr, dynamic_ncols=True)
        try:
            for lo in range(0, len(prepared), self.batch):
                chunk = prepared[lo : lo + self.batch]
                errors_before = self.engine.tap_stats().get("hook_errors", 0)
                req_ids = self.engine.prefill([ids for _, ids in chunk])
                sums = self.engine.pop_captured(req_ids)
                self._wait_frames(req_ids)
                errors = self.engine.tap_stats().get("hook_errors", 0) - errors_before
                for (rid, _), req in zip(chunk, req_ids):
                    frames = self.collector.take(req)
                    if errors:  # the tap skipped work in this batch: no text of it is trustworthy
                        yield rid, None, None, f"the tap reported {errors} hook error(s) in its batch (see the log)"
                        continue
                    yield rid, frames, sums.get(req), None
                bar.update(len(chunk))
        finally:
            bar.close()

    def _wait_frames(self, req_ids: list[str]) -> None:
        """Wait until every request's final frames of every layer arrived, or the
        exporter has delivered everything the tap emitted (the requests still
        missing some then fail in features: their windows were dropped, e.g. NaN
        activations). In-process, every frame of the batch has been emitted when
        `prefill` returns. Raises OfflineError on timeout."""
        c = self.collector
        want = set(self.layers)
        deadline = time.monotonic() + self.frame_timeout_s
        next_poll = 0.0
        st: dict = {}
        while True:
            with c.cond:
                missing = {r for r in req_ids if not want <= c.finals.get(r, set())}
                received = c.received
            if not missing:
                return
            now = time.monotonic()
            if now >= next_poll:
                st = self.engine.tap_stats()
                next_poll = now + 0.5
                if (st.get("queued_batches", 1) == 0
                        and st.get("frames_emitted", 0) == st.get("frames_sent", 0) + st.get("frames_dropped", 0)
                        and received >= st.get("frames_sent", 0)):
                    return
            if now >= deadline:
                raise OfflineError(
                    f"--engine vllm: the final frames of {len(missing)} request(s) did not arrive within "
                    f"{self.frame_timeout_s:.0f} s (e.g. request {sorted(missing)[0]!r}); tap: "
                    f"connected={st.get('connected')}, frames emitted={st.get('frames_emitted')} "
                    f"sent={st.get('frames_sent')} dropped={st.get('frames_dropped')}, sidecar received={received}, "
                    f"hook errors={st.get('hook_errors')}")
            with c.cond:
                c.cond.wait(timeout=0.1)

    def close(self) -> None:
        if self.engine is not None:
            for warning in self.engine.close():
                log(f"warning: --engine vllm: {warning}")
            self.engine = None
        self.sidecar.stop()
