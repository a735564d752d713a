"""Tap configuration: one dataclass, read from the environment (vLLM starts
workers in fresh processes, so env vars are the one channel that reaches them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .frames import DEFAULT_SIDECAR

ENV_PREFIX = "EIGENWATCH_"
SPECTRA_AT = ("auto", "sidecar", "tap")
SIDECAR_SPECTRA_MAX_WINDOW = 64  # a 64×64 float32 Gram is 16 KiB per frame


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name}: expected an integer in [{lo}, {hi}], got {raw!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{ENV_PREFIX}{name}: expected an integer in [{lo}, {hi}], got {value}")
    return value


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(ENV_PREFIX + name, default).strip().lower()
    if raw not in choices:
        raise ValueError(f"{ENV_PREFIX}{name}: expected one of {', '.join(choices)}, got {raw!r}")
    return raw


def parse_layers(raw: str | None, source: str = ENV_PREFIX + "LAYERS") -> tuple[int, ...] | None:
    """'1,2,-1' -> (1, 2, -1); '' or None -> None (choose three spread over depth).
    `source` names the setting in the error (the variable, or a flag)."""
    if raw is None or raw.strip() == "":
        return None
    try:
        return tuple(int(x) for x in raw.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(
            f"{source}: expected comma-separated layer indices like '4,16,28' "
            f"(negative counts from the end), got {raw!r}"
        ) from None


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Three layers spread over depth (fewer when the model is shallower)."""
    picks = {num_layers // 4, num_layers // 2, (3 * num_layers) // 4}
    return tuple(sorted(i for i in picks if 0 <= i < num_layers))


def resolve_layers(requested: tuple[int, ...] | None, num_layers: int) -> tuple[int, ...]:
    if requested is None:
        return default_layers(num_layers)
    out = []
    for i in requested:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(
                f"{ENV_PREFIX}LAYERS: layer {i} is out of range for a model with "
                f"{num_layers} layers (accepted: {-num_layers}..{num_layers - 1})"
            )
        out.append(j)
    return tuple(sorted(set(out)))


@dataclass
class TapConfig:
    # Where the sidecar listens: "host:port" or "unix:///path".
    sidecar: str = DEFAULT_SIDECAR
    layers: tuple[int, ...] | None = None
    window: int = 32  # W rows per window
    stride: int = 16  # a frame every `stride` tokens (and one at request end)
    # Requests are monitored unless they opt out ("on"), or only when they opt
    # in ("off"); per request: SamplingParams.extra_args["eigenwatch"] = "on"/"off".
    default: str = "on"
    model: str = ""  # the `model` label on frames; "" = the served model name
    max_requests: int = 512  # monitored at once; more are counted, not tracked
    # Randomly project rows to this many dims before the window Gram (0: off).
    # Fixes the MP ratio γ = (W−1)/k across layers of different width and
    # bounds the window memory at W·k floats per request and layer.
    proj_dim: int = 0
    queue_batches: int = 256  # step batches waiting for the exporter
    # How rows leave the forward (hooks/_vllm_worker.py): "aux" outputs of the
    # compiled forward where the model has them, else forward hooks; "auto" picks.
    capture: str = "auto"
    # Where a window's spectrum and descriptors are computed: "sidecar" (frames
    # carry the W×W centred Gram; the serving process only copies it), "tap"
    # (the exporter thread computes them; frames carry W eigenvalues and the
    # descriptors, ~20× smaller at W = 32), "auto": sidecar up to
    # SIDECAR_SPECTRA_MAX_WINDOW rows, tap above (a Gram grows as W²).
    spectra: str = "auto"
    # Streaming top-direction sketches (hooks/sketches.py): "on" sends the sidecar's drift detector the
    # top directions of each tapped layer every `sketch_every` tokens of all requests (never rows);
    # `sketch_sample` = s feeds one row in s to the sketch (the overhead budget). Both must match the
    # calibration's (`calibrate --drift-every/--drift-sample`).
    sketch: str = "off"
    sketch_every: int = 4096
    sketch_sample: int = 1

    def spectra_in_sidecar(self) -> bool:
        """Whether frames leave as centred Grams (the `spectra` setting resolved)."""
        if self.spectra == "auto":
            return self.window <= SIDECAR_SPECTRA_MAX_WINDOW
        return self.spectra == "sidecar"

    @classmethod
    def from_env(cls) -> "TapConfig":
        cfg = cls(
            sidecar=os.environ.get(ENV_PREFIX + "SIDECAR", cls.sidecar).strip(),
            layers=parse_layers(os.environ.get(ENV_PREFIX + "LAYERS")),
            window=_env_int("WINDOW", cls.window, 2, 1024),
            stride=_env_int("STRIDE", cls.stride, 1, 1 << 20),
            default=_env_choice("DEFAULT", cls.default, ("on", "off")),
            model=os.environ.get(ENV_PREFIX + "MODEL_NAME", "").strip(),
            max_requests=_env_int("MAX_REQUESTS", cls.max_requests, 1, 1 << 20),
            proj_dim=_env_int("PROJ_DIM", cls.proj_dim, 0, 1 << 20),
            spectra=_env_choice("SPECTRA", cls.spectra, SPECTRA_AT),
            queue_batches=_env_int("QUEUE_BATCHES", cls.queue_batches, 1, 1 << 20),
            capture=_env_choice("CAPTURE", cls.capture, ("auto", "aux", "hooks")),
            sketch=_env_choice("SKETCH", cls.sketch, ("on", "off")),
            sketch_every=_env_int("SKETCH_EVERY", cls.sketch_every, 2, 1 << 30),
            sketch_sample=_env_int("SKETCH_SAMPLE", cls.sketch_sample, 1, 1 << 20),
        )
        if cfg.sketch_sample > cfg.sketch_every:  # every window must keep a row
            raise ValueError(f"{ENV_PREFIX}SKETCH_SAMPLE: expected an integer in [1, {ENV_PREFIX}SKETCH_EVERY="
                             f"{cfg.sketch_every}], got {cfg.sketch_sample}")
        return cfg


def enabled() -> bool:
    """The plugin acts only when asked to, and EIGENWATCH_DISABLE=1 always wins
    (a kill switch operators can flip without touching the install)."""
    if os.environ.get(ENV_PREFIX + "DISABLE", "").strip() in ("1", "true", "yes"):
        return False
    return os.environ.get(ENV_PREFIX + "ENABLE", "").strip() in ("1", "true", "yes")


_OPT_ON = ("on", "1", "true", "yes")
_OPT_OFF = ("off", "0", "false", "no")


def _opt_value(value) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _OPT_ON else False if text in _OPT_OFF else None


def request_opt(extra_args: dict | None, default: str) -> bool:
    """Whether one request is monitored, from its extra_args (vllm_xargs)."""
    value = _opt_value((extra_args or {}).get("eigenwatch", default))
    # A bad per-request value must not fail the request: fall back to the
    # default (bad_request_opt says what was wrong; the tap counts it).
    return default == "on" if value is None else value


def bad_request_opt(extra_args: dict | None) -> str | None:
    """What is wrong with a request's `eigenwatch` extra arg, or None when it is
    absent or valid."""
    if not extra_args or "eigenwatch" not in extra_args:
        return None
    value = extra_args["eigenwatch"]
    if _opt_value(value) is not None:
        return None
    return (f"vllm_xargs.eigenwatch: {value!r} is not one of 'on' or 'off' "
            f"(also accepted: {', '.join(_OPT_ON[1:] + _OPT_OFF[1:])}); the request runs with the default")
