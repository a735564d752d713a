"""`--engine vllm` for `eigenwatch calibrate / score / extract`: the features of
`offline.extract`, computed by the real vLLM engine with the real tap.

One in-process vLLM engine (`vllm.LLM`, float32, prefix caching off so every
prompt row is computed and seen) with the eigenwatch plugin enabled through
the environment. Its exporter streams FrameBatch messages over real gRPC to
an in-process collector that implements Monitor.Ingest on 127.0.0.1; frames
map back to texts by the request id vLLM gives each output. Generate models
run prefill only (max_tokens=1: the tap sees exactly the prompt rows); pooling
models run one pooling pass. Texts are tokenised with the same HF tokenizer
and truncation rule as `offline.extract`, and go in as token ids, so both
engines see identical tokens.

"pooled" and "llmcheck" come from the worker extension's capture mode
(`eigenwatch_capture`, `eigenwatch_pop_captured`): per request and tapped
layer the row count n, the row sum s and the scatter S = XᵀX, in float64. Then
pooled = s/n, and with the centred scatter C = S − n·μμᵀ (μ = s/n), whose
eigenvalues are the σ_i² of the token-centred matrix Z (plus zeros),
    llmcheck = mean over the top min(n, d) eigenvalues of ½·log(max(λ, 0) + 1e-3)
— the same number `offline.llmcheck_hidden` computes from the rows.

vLLM and torch are imported inside the function only.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eigenwatch.monitor.offline import (RIDGE, InputStats, OfflineError, frame_features, log, max_positions,
                                        token_features, tokenize)


BATCH = 64  # texts per engine call: bounds the tap's per-request state and what waits here
FRAME_TIMEOUT_S = 60.0  # for the exporter to deliver a batch's last frames


def llmcheck_scatter(count: int, total: np.ndarray, scatter: np.ndarray, ridge: float = RIDGE) -> float:
    """LLM-Check hidden score from (n, Σx [d], XᵀX [d, d]): equal to
    `offline.llmcheck_hidden(X)` for the n×d matrix X those sums came from."""
    mu = np.asarray(total, dtype=np.float64) / count
    c = np.asarray(scatter, dtype=np.float64) - count * np.outer(mu, mu)  # Zᵀ Z
    c = 0.5 * (c + c.T)
    lam = np.linalg.eigvalsh(c)[::-1][: min(count, c.shape[0])]  # σ_i², descending
    return float(np.mean(0.5 * np.log(np.maximum(lam, 0.0) + ridge)))


# ---------------------------------------------------------------- the collector

@dataclass
class _Frame:
    """What `frames_to_sequence` and the features read from one wire frame."""

    request_id: str
    engine_request_id: str
    layer: int
    token_count: int
    window: int
    dim: int
    eigenvalues: np.ndarray  # [W] float32, as on the wire
    descriptors: np.ndarray  # [D] float64, in DESCRIPTOR_NAMES order
    final: bool


def _collector_class():
    from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

    class Collector(monitor_pb2_grpc.MonitorServicer):
        """Monitor.Ingest that keeps every frame, by request id (client and engine id)."""

        def __init__(self, names: tuple[str, ...]):
            self.names = list(names)
            self.cond = threading.Condition()
            self.frames: dict[str, list[_Frame]] = {}
            self.finals: dict[str, set[int]] = {}
            self.received = 0
            self.errors: list[str] = []

        def Ingest(self, request_iterator, context):
            accepted = 0
            for batch in request_iterator:
                if not batch.frames:
                    continue
                if list(batch.descriptor_names) != self.names:
                    with self.cond:
                        self.errors.append(f"descriptor names differ from this version's: {list(batch.descriptor_names)}")
                        self.cond.notify_all()
                    continue
                got = [_Frame(f.request_id, f.engine_request_id, f.layer, f.token_count, f.window, f.dim,
                              np.asarray(f.eigenvalues, dtype=np.float32),
                              np.asarray(f.descriptors, dtype=np.float64), f.final) for f in batch.frames]
                with self.cond:
                    for f in got:
                        self.frames.setdefault(f.request_id, []).append(f)
                        if f.final:
                            self.finals.setdefault(f.request_id, set()).add(f.layer)
                    self.received += len(got)
                    accepted += len(got)
                    self.cond.notify_all()
            return monitor_pb2.IngestSummary(frames_accepted=accepted)

        def take(self, rid: str) -> list[_Frame]:
            with self.cond:
                self.finals.pop(rid, None)
                return self.frames.pop(rid, [])

    return Collector


def _start_collector(names):
    import grpc
    from concurrent.futures import ThreadPoolExecutor

    from eigenwatch.v1 import monitor_pb2_grpc

    collector = _collector_class()(names)
    server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="eigenwatch-collect"),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    monitor_pb2_grpc.add_MonitorServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        raise OfflineError("--engine vllm: cannot listen on 127.0.0.1 for the tap's frames")
    server.start()
    return collector, server, f"127.0.0.1:{port}"


# ---------------------------------------------------------------- inputs

def _prepare(model_path: Path, items, max_length: int | None, stats: InputStats):
    """(tokenizer, config, [(id, token ids)]) with `offline.extract`'s truncation
    rule, messages and counters."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    cfg = AutoConfig.from_pretrained(model_path)
    prepared = tokenize(tok, items, max_length or max_positions(cfg, tok), stats)
    return tok, cfg, prepared


def _num_layers(cfg) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


# ---------------------------------------------------------------- the engine

def _engine_env(sidecar: str, key: str, layers, window: int, stride: int, batch: int) -> dict[str, str | None]:
    env = {
        "EIGENWATCH_ENABLE": "1",
        "EIGENWATCH_DISABLE": None,  # asked for explicitly: the serving kill switch does not apply
        "EIGENWATCH_SIDECAR": sidecar,
        "EIGENWATCH_LAYERS": ",".join(str(int(l)) for l in layers) if layers else "",
        "EIGENWATCH_WINDOW": str(window),
        "EIGENWATCH_STRIDE": str(stride),
        "EIGENWATCH_DEFAULT": "on",
        "EIGENWATCH_MODEL_NAME": key,
        "EIGENWATCH_PROJ_DIM": "0",  # the HF tap has no projection
        "EIGENWATCH_MAX_REQUESTS": str(max(512, 4 * batch)),
        "EIGENWATCH_QUEUE_BATCHES": "65536",  # offline: never drop for a full queue
        # In-process engine: the worker (and its tap) live in this process, so
        # collective_rpc returns the captured float64 arrays as they are.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; CPU only, ignored on GPUs. Prefill of one batch needs little.
    return env


def _set_env(env: dict[str, str | None]) -> dict[str, str | None]:
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return saved


def _tap_stats(llm) -> dict:
    for st in llm.collective_rpc("eigenwatch_stats"):
        if st.get("installed"):
            return st
    return {"installed": False}


def _run_batch(llm, runner: str, prompts, pooling_task):
    from vllm import SamplingParams

    if runner == "pooling":
        outs = llm.encode(prompts, pooling_task=pooling_task, use_tqdm=False)
    else:
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        outs = llm.generate(prompts, params, use_tqdm=False)
    # The tap closes a request (its final frames) when the worker hears it
    # finished: in the step after its last. The in-process engine stops
    # stepping once every output is done, so run that one bookkeeping step.
    llm.llm_engine.step()
    return [str(o.request_id) for o in outs]


def _wait_frames(llm, collector, req_ids: list[str], layers: tuple[int, ...], timeout: float) -> set[str]:
    """Wait until every request's final frames of every layer arrived, or the
    exporter has delivered everything the tap emitted (then the requests still
    missing some are returned: their windows were dropped, e.g. NaN
    activations). In-process, every frame of the batch has been emitted when
    `_run_batch` returns. Raises OfflineError on timeout."""
    want = set(layers)
    deadline = time.monotonic() + timeout
    next_poll = 0.0
    st: dict = {}
    while True:
        with collector.cond:
            missing = {r for r in req_ids if not want <= collector.finals.get(r, set())}
            received = collector.received
            if collector.errors:
                raise OfflineError(f"--engine vllm: the tap's frames are unusable: {collector.errors[0]}")
            if not missing:
                return set()
        now = time.monotonic()
        if now >= next_poll:
            st = _tap_stats(llm)
            next_poll = now + 0.5
            drained = (st.get("queued_batches", 1) == 0
                       and st.get("frames_emitted", 0) == st.get("frames_sent", 0) + st.get("frames_dropped", 0)
                       and received >= st.get("frames_sent", 0))
            if drained:
                return missing
        if now >= deadline:
            raise OfflineError(
                f"--engine vllm: the final frames of {len(missing)} request(s) did not arrive within {timeout:.0f} s "
                f"(e.g. request {sorted(missing)[0]!r}); tap: connected={st.get('connected')}, "
                f"frames emitted={st.get('frames_emitted')} sent={st.get('frames_sent')} "
                f"dropped={st.get('frames_dropped')}, collector received={received}, "
                f"hook errors={st.get('hook_errors')}")
        with collector.cond:
            collector.cond.wait(timeout=0.1)


def _features(rid, ids, frames: list[_Frame], cap, layers: tuple[int, ...], stats: InputStats,
              token=None) -> dict | None:
    part = frame_features(frames, layers)

    def fail(why: str) -> None:
        stats.failed += 1
        log(f"skipped: text {rid!r}: {why}")

    if not cap or any(l not in cap for l in layers):
        fail("the tap captured no hidden states for some layer")
        return None
    sums = {l: (int(cap[l][0]), np.asarray(cap[l][1], dtype=np.float64), np.asarray(cap[l][2], dtype=np.float64))
            for l in layers}
    if not all(np.isfinite(s).all() and np.isfinite(S).all() for _, s, S in sums.values()):
        fail("NaN/Inf activations")
        return None
    if any(n != len(ids) for n, _, _ in sums.values()):
        fail(f"the tap saw {[n for n, _, _ in sums.values()]} rows of {len(ids)} tokens")
        return None
    if part is None:
        fail("the tap produced no frame for some layer")
        return None
    mid = layers[len(layers) // 2]
    return dict(part, pooled={l: sums[l][1] / sums[l][0] for l in layers}, llmcheck=llmcheck_scatter(*sums[mid]),
                **token_features(token, sums))


def extract_vllm(model_path: Path, runner: str, key: str, items, layers, window: int, stride: int,
                 max_length: int | None, stats: InputStats, desc: str, token=None, *, batch: int = BATCH,
                 enforce_eager: bool = True,
                 frame_timeout_s: float = FRAME_TIMEOUT_S) -> tuple[list[str], list[dict], tuple[int, ...]]:
    """`offline.extract` on the vLLM engine: returns (ids, features, tapped layers).

    model_path/runner: from `hooks.models.resolve_model`; key: the model name of
    the frames (the calibration's model key). enforce_eager skips torch.compile
    (its start-up costs more than it saves on a few thousand prompts); the tap
    also works compiled."""
    import gc

    from tqdm import tqdm

    from eigenwatch.hooks.config import resolve_layers
    from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES

    if window < 2 or stride < 1:
        raise OfflineError("--window must be >= 2 and --stride >= 1")
    model_path = Path(model_path)
    _, cfg, prepared = _prepare(model_path, items, max_length, stats)
    n_layers = _num_layers(cfg)
    try:
        expected = resolve_layers(tuple(layers) if layers else None, n_layers) if n_layers else None
    except ValueError as exc:
        raise OfflineError(f"--layers: {exc}") from None
    if not prepared:
        return [], [], expected or tuple(layers or ())

    collector, server, target = _start_collector(tuple(DESCRIPTOR_NAMES))
    saved = _set_env(_engine_env(target, key, layers, window, stride, batch))
    llm = None
    try:
        from vllm import LLM
        from vllm.inputs import TokensPrompt

        from eigenwatch.hooks import vllm_plugin

        vllm_plugin.register()  # vLLM loads plugins once per process: maybe before the env said "enable"
        longest = max(len(ids) for _, ids in prepared)
        maxpos = getattr(cfg, "max_position_embeddings", None)
        need = longest + (1 if runner != "pooling" else 0)  # vLLM wants room for the one sampled token
        if maxpos and need > maxpos and "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in saved:
            # The sampled token's position is never computed (prefill only).
            saved.update(_set_env({"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}))
        kwargs = dict(model=str(model_path), tokenizer=str(model_path), dtype="float32", seed=0,
                      max_model_len=need, enable_prefix_caching=False, enforce_eager=enforce_eager)
        if runner == "pooling":
            kwargs["runner"] = "pooling"
        try:
            llm = LLM(**kwargs)
        except Exception as exc:
            raise OfflineError(f"--engine vllm: vLLM could not start {model_path}: {exc}") from exc
        st = _tap_stats(llm)
        if not st.get("installed"):
            raise OfflineError(f"--engine vllm: the eigenwatch tap is not installed in the vLLM worker "
                               f"({st.get('reason', 'is the eigenwatch vLLM plugin registered?')})")
        tapped = tuple(st["layers"])
        if expected is not None and tapped != expected:
            raise OfflineError(f"--layers: vLLM's layer stack gives layers {list(tapped)}, expected {list(expected)}")
        deadline = time.monotonic() + 30
        while not _tap_stats(llm).get("connected"):
            if time.monotonic() > deadline:
                raise OfflineError(f"--engine vllm: the tap did not connect to the frame collector at {target}")
            time.sleep(0.05)
        if not any(llm.collective_rpc("eigenwatch_capture", args=(True,))):
            raise OfflineError("--engine vllm: the tap's capture mode is unavailable")
        pooling_task = None
        if runner == "pooling":
            tasks = tuple(getattr(llm, "supported_tasks", ()) or ())
            pooling_task = next((t for t in ("embed", "token_embed", "classify", "score") if t in tasks), None)
            if pooling_task is None:
                raise OfflineError(f"--engine vllm: {model_path} supports none of vLLM's pooling tasks ({tasks})")

        ids_out: list[str] = []
        feats: list[dict] = []
        bar = tqdm(total=len(prepared), desc=desc, unit="text", file=sys.stderr, dynamic_ncols=True)
        try:
            for lo in range(0, len(prepared), batch):
                chunk = prepared[lo : lo + batch]
                errors_before = _tap_stats(llm).get("hook_errors", 0)
                req_ids = _run_batch(llm, runner, [TokensPrompt(prompt_token_ids=ids) for _, ids in chunk],
                                     pooling_task)
                popped: dict = {}
                for part in llm.collective_rpc("eigenwatch_pop_captured", args=(req_ids,)):
                    popped.update(part or {})
                _wait_frames(llm, collector, req_ids, tapped, frame_timeout_s)
                errors = _tap_stats(llm).get("hook_errors", 0) - errors_before
                for (rid, ids), req in zip(chunk, req_ids):
                    frames = collector.take(req)
                    if errors:  # the tap skipped work in this batch: no text of it is trustworthy
                        stats.failed += 1
                        log(f"skipped: text {rid!r}: the tap reported {errors} hook error(s) in its batch (see the log)")
                        continue
                    f = _features(rid, ids, frames, popped.get(req), tapped, stats, token)
                    if f is not None:
                        feats.append(f)
                        ids_out.append(rid)
                bar.update(len(chunk))
        finally:
            bar.close()
        return ids_out, feats, tapped
    finally:
        if llm is not None:
            try:
                llm.collective_rpc("eigenwatch_uninstall")
            except Exception as exc:
                log(f"warning: --engine vllm: uninstalling the tap failed: {exc}")
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as exc:
                log(f"warning: --engine vllm: engine shutdown failed: {exc}")
            del llm
            gc.collect()
            gc.unfreeze()  # vLLM froze this process's heap at engine start
        try:
            import vllm.envs

            vllm.envs.disable_envs_cache()  # the in-process engine cached our settings
        except Exception as exc:
            log(f"warning: --engine vllm: could not reset vLLM's environment cache: {exc}")
        _set_env(saved)
        server.stop(grace=None)
