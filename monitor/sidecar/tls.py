"""Who may talk to the sidecar: the bearer token (from --token-file or
EIGENWATCH_TOKEN, checked at start), TLS / mTLS server credentials whose
certificate files are re-read when they change, the rule that a non-loopback
address needs authentication, and owner-only Unix sockets.

`load(cfg)` checks everything before anything is served and raises
SecurityError with a message naming the flag or variable; `Security.bind`
opens the listening port with the right credentials. The token never appears
in a message, a log line or the config's repr.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
from dataclasses import dataclass

import grpc

from eigenwatch.hooks.config import token_problem, read_token_file

log = logging.getLogger("eigenwatch.sidecar")

TOKEN_ENV = "EIGENWATCH_TOKEN"
HOW_TO_SECURE = ("set a token (--token-file FILE or EIGENWATCH_TOKEN) and/or require client certificates "
                 "(--tls-cert FILE --tls-key FILE --tls-client-ca FILE), or pass --allow-insecure-listen "
                 "to serve it unauthenticated anyway")


class SecurityError(ValueError):
    """A setting of the sidecar's auth or transport that cannot be served; the message names it."""


def is_local(listen: str) -> bool:
    """Whether `listen` is reachable only from this machine: a Unix socket or a loopback host."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "", a wildcard, or a host name: reachable from elsewhere as far as we can tell


def _check_pem(flag: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SecurityError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise SecurityError(f"{flag}: {path} is not a PEM file (expected '-----BEGIN ...' blocks)")


class CertificateFiles:
    """The server's certificate, key and optional client CA as files, read again
    when any of them changes (a Kubernetes secret update, cert-manager renewal).

    gRPC calls `fetch` before every TLS handshake; it costs three stat() calls
    unless a file changed. A changed set that does not load (a half-written
    file, a key that does not match the new certificate) keeps the previous
    certificates and is logged once, so rotation never takes the server down."""

    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._bad_stamp = None
        self.reloads = 0
        self.initial = self._load()  # raises SecurityError: at start a bad file is fatal

    def _paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def _stat(self):
        out = []
        for p in self._paths():
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        _check_pem("--tls-cert", self.cert)
        _check_pem("--tls-key", self.key)
        if self.client_ca:
            _check_pem("--tls-client-ca", self.client_ca)
        # The standard library's TLS checks what gRPC would only find at the first
        # handshake: a key that does not belong to the certificate, a CA file with no certificate.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, ValueError) as exc:
            raise SecurityError(f"--tls-cert/--tls-key: {self.cert} and {self.key} do not load as a certificate "
                                f"chain and its private key ({exc}); the key must be the certificate's, "
                                f"unencrypted PEM") from None
        if self.client_ca:
            try:
                ctx.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, ValueError) as exc:
                raise SecurityError(f"--tls-client-ca: {self.client_ca} holds no usable CA certificate "
                                    f"({exc})") from None
        with open(self.cert, "rb") as f:
            cert = f.read()
        with open(self.key, "rb") as f:
            key = f.read()
        roots = None
        if self.client_ca:
            with open(self.client_ca, "rb") as f:
                roots = f.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None = keep the current certificates (gRPC's contract for the fetcher)."""
        try:
            with self._lock:
                stamp = self._stat()
                if stamp == self._stamp or stamp == self._bad_stamp:
                    return None
                try:
                    config = self._load()
                except (SecurityError, OSError) as exc:
                    self._bad_stamp = stamp
                    log.warning("TLS certificate files changed but do not load; keeping the previous ones: %s", exc)
                    return None
                self._stamp, self._bad_stamp = stamp, None
                self.reloads += 1
                log.info("TLS certificate files reloaded (%s)", ", ".join(self._paths()))
                return config
        except Exception:  # gRPC's core calls this: never raise into it
            log.exception("TLS certificate reload check failed; keeping the previous certificates")
            return None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch,
                                                   require_client_authentication=bool(self.client_ca))


@dataclass
class Security:
    token: str | None
    files: CertificateFiles | None

    @property
    def tls(self) -> bool:
        return self.files is not None

    def bind(self, server, address: str) -> int:
        """Open `address` on `server` (0 when it could not). A Unix socket is made
        owner-only: the umask covers the moment it is created, the chmod makes sure."""
        creds = self.files.credentials() if self.files is not None else None

        def add() -> int:
            return server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)

        if not address.startswith("unix:"):
            return add()
        path = address[len("unix://"):] if address.startswith("unix://") else address[len("unix:"):]
        # umask is per process: another thread creating a file in this instant gets
        # owner-only permissions too, which errs on the safe side.
        old = os.umask(0o177)
        try:
            port = add()
        finally:
            os.umask(old)
        try:
            os.chmod(path, 0o600)
        except OSError as exc:
            log.warning("--listen %s: could not make the socket owner-only: %s", address, exc.strerror or exc)
        return port


def resolve_token(token_file: str | None, env_token: str | None) -> str | None:
    """The token from --token-file (one trailing newline stripped) or EIGENWATCH_TOKEN,
    None when neither is set. Raises SecurityError for both, an empty one or one with whitespace."""
    if token_file is not None and env_token is not None:
        raise SecurityError(f"--token-file and {TOKEN_ENV} are both set; use one (unset {TOKEN_ENV} "
                            f"to read the token from the file)")
    if token_file is not None:
        try:
            return read_token_file(token_file, "--token-file")
        except ValueError as exc:
            raise SecurityError(str(exc)) from None
    if env_token is not None:
        problem = token_problem(env_token)
        if problem:
            raise SecurityError(f"{TOKEN_ENV}: {problem}")
        return env_token
    return None


def load(cfg) -> Security:
    """Check the sidecar's token, TLS files and listen address (a SidecarConfig)
    before anything is served."""
    token = resolve_token(cfg.token_file, cfg.token)
    cert, key, ca = cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca
    if (cert is None) != (key is None):
        raise SecurityError("--tls-cert and --tls-key go together: pass both (the server's certificate chain "
                            "and its private key, PEM)")
    if ca is not None and cert is None:
        raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked "
                            "only over TLS")
    files = CertificateFiles(cert, key, ca) if cert is not None else None
    if not cfg.listen.startswith(("unix:", "unix-abstract:")) and not cfg.listen.rpartition(":")[2].isdigit():
        raise SecurityError(f"--listen {cfg.listen}: expected host:port (e.g. 127.0.0.1:50151, 0 for any free "
                            f"port) or unix:///path")
    if not is_local(cfg.listen):
        if token is None and ca is None and not cfg.allow_insecure_listen:
            raise SecurityError(f"--listen {cfg.listen}: refusing to serve a non-loopback address without "
                                f"authentication (anyone who reaches it could send frames and read reports); "
                                f"{HOW_TO_SECURE}")
        if token is not None and files is None:
            log.warning("--listen %s: the bearer token crosses the network in the clear; add --tls-cert and "
                        "--tls-key", cfg.listen)
    return Security(token, files)
