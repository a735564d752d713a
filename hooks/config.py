"""Tap configuration: one dataclass, read from the environment (vLLM starts
workers in fresh processes, so env vars are the one channel that reaches them),
and `ClientSecurity`: the token and TLS files a client (the tap's exporter, the
CLI) uses to reach the sidecar."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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


def resolve_layers(requested: tuple[int, ...] | None, num_layers: int,
                   source: str = ENV_PREFIX + "LAYERS") -> tuple[int, ...]:
    """Indices (negative from the end) -> sorted layer numbers; `source` names
    where the indices came from (the variable, a flag, a file) in the error."""
    if requested is None:
        return default_layers(num_layers)
    out = []
    for i in requested:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(
                f"{source}: layer {i} is out of range for a model with "
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
    # Lexical signatures (hooks/signatures.py): the top `signature_topk` terms of each request's sparse
    # head at this tapped layer travel in its final frame; None: off.
    signature_layer: int | None = None
    signature_topk: int = 64
    # Pooled embeddings of finished requests, for the sidecar's Shield.WatchEmbeddings
    # (hooks/embeddings.py): "off"; "output": the pooling runner's output embedding
    # (embedding models served with runner="pooling"); or a tapped layer's index: the
    # mean of the request's rows there. Only requests that also ask
    # (vllm_xargs eigenwatch_embed=on) send theirs: embeddings leave when asked for.
    embeddings: str = "off"
    # "on": every monitored request sends its embedding unless it says eigenwatch_embed=off (vLLM's
    # /v1/embeddings API has no per-request extra args, so this is how its requests ask).
    embed_default: str = "off"
    # CALIB.json from `eigenwatch calibrate` (EIGENWATCH_CALIBRATION): the tap computes the
    # combined score's hidden-state statistics against its Gaussians (hooks/hidden.py) and
    # sends them on final frames; "" = off.
    calibration: str = ""

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
            signature_layer=_env_int("SIGNATURE_LAYER", None, -(1 << 20), 1 << 20),
            signature_topk=_env_int("SIGNATURE_TOPK", cls.signature_topk, 1, 1 << 20),
            embeddings=_env_embeddings(),
            embed_default=_env_choice("EMBED_DEFAULT", cls.embed_default, ("on", "off")),
            calibration=os.environ.get(ENV_PREFIX + "CALIBRATION", "").strip(),
        )
        if cfg.sketch_sample > cfg.sketch_every:  # every window must keep a row
            raise ValueError(f"{ENV_PREFIX}SKETCH_SAMPLE: expected an integer in [1, {ENV_PREFIX}SKETCH_EVERY="
                             f"{cfg.sketch_every}], got {cfg.sketch_sample}")
        return cfg


def _env_embeddings() -> str:
    raw = os.environ.get(ENV_PREFIX + "EMBEDDINGS", "off").strip().lower()
    if raw in ("off", "output"):
        return raw
    try:
        int(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}EMBEDDINGS: expected 'off', 'output' (the pooling runner's embedding) or "
                         f"the index of a tapped layer (see {ENV_PREFIX}LAYERS), got {raw!r}") from None
    return raw


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


def embed_opt(extra_args: dict | None, default: str = "off") -> bool:
    """Whether a request asked for its embedding (vllm_xargs eigenwatch_embed=on, or
    the server's EIGENWATCH_EMBED_DEFAULT=on); unreadable: no (embeddings leave only
    when asked for)."""
    return bool(_opt_value((extra_args or {}).get("eigenwatch_embed", default)))


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


# ---- how clients reach the sidecar: token and TLS (the tap's exporter, the CLI) ------------

def token_problem(token: str) -> str | None:
    """What makes `token` unusable as a bearer token, None when it is fine.
    gRPC metadata carries printable ASCII; whitespace is almost always a copy or
    file artefact that would make every call fail authentication."""
    if token == "":
        return "is set but empty; set the token, or unset the variable for no authentication"
    if any(c.isspace() for c in token):
        return ("contains whitespace or a newline (a copy/paste or file artefact?); a token is one word of "
                "printable ASCII, e.g. from `openssl rand -hex 32`")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        return "contains characters outside printable ASCII (gRPC metadata cannot carry them)"
    return None


def read_token_file(path: str, source: str) -> str:
    """A token file's content with ONE trailing newline stripped (the way editors
    and `echo` write files); anything else that is whitespace is an error."""
    try:
        with open(path, encoding="ascii", errors="strict") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{source}: {path} contains characters outside printable ASCII (gRPC metadata "
                         f"cannot carry them)") from None
    except OSError as exc:
        raise ValueError(f"{source}: cannot read {path}: {exc.strerror or exc}") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    problem = token_problem(text)
    if problem:
        problem = problem.replace("is set but empty; set the token, or unset the variable",
                                  "is empty; write the token into it, or drop the setting")
        raise ValueError(f"{source}: {path} {problem} (one trailing newline is ignored)")
    return text


@dataclass(frozen=True)
class ClientSecurity:
    """How a client authenticates to the sidecar and checks it: read from
    EIGENWATCH_TOKEN or EIGENWATCH_TOKEN_FILE, and EIGENWATCH_TLS_CA (the CA that
    signed the sidecar's certificate; turns TLS on), EIGENWATCH_TLS_CERT +
    EIGENWATCH_TLS_KEY (a client certificate, for a sidecar that requires one),
    EIGENWATCH_TLS_SERVER_NAME (the name to check the sidecar's certificate
    against when the address is an IP or another name). The files are read at
    every connect, so renewed certificates take effect at the next reconnect."""

    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    @classmethod
    def from_env(cls, environ=None) -> "ClientSecurity":
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            raw = env.get(ENV_PREFIX + name)
            return None if raw is None or raw.strip() == "" else raw.strip()

        token, token_file = env.get(ENV_PREFIX + "TOKEN"), get("TOKEN_FILE")
        if token is not None and token_file is not None:
            raise ValueError(f"{ENV_PREFIX}TOKEN and {ENV_PREFIX}TOKEN_FILE are both set; use one")
        if token_file is not None:
            token = read_token_file(token_file, ENV_PREFIX + "TOKEN_FILE")
        elif token is not None and token_problem(token):
            raise ValueError(f"{ENV_PREFIX}TOKEN: {token_problem(token)}")
        sec = cls(token, get("TLS_CA"), get("TLS_CERT"), get("TLS_KEY"), get("TLS_SERVER_NAME"))
        if (sec.tls_cert is None) != (sec.tls_key is None):
            raise ValueError(f"{ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY go together: set both (the client "
                             f"certificate and its private key, PEM) or neither")
        for name, path in (("TLS_CA", sec.tls_ca), ("TLS_CERT", sec.tls_cert), ("TLS_KEY", sec.tls_key)):
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{ENV_PREFIX}{name}: cannot read {path}")
        return sec

    def metadata(self) -> tuple | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def channel(self, target: str, options=()):
        """A new gRPC channel to the sidecar; TLS files are read now (OSError if they cannot be)."""
        import grpc

        options = list(options)
        if not self.tls:
            return grpc.insecure_channel(target, options=options)

        def read(path):
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca), private_key=read(self.tls_key),
                                             certificate_chain=read(self.tls_cert))
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return grpc.secure_channel(target, creds, options=options)
