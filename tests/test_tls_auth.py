"""Auth and transport of the sidecar and the tap's exporter: TLS and mTLS
handshakes (certificates made here with `cryptography`), certificate reload,
token variants from a file or the environment, the non-loopback listen rule
and owner-only Unix sockets. Real sidecar processes, real gRPC clients."""

import datetime
import ipaddress
import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eigenwatch.hooks.config import ClientSecurity
from eigenwatch.hooks.export import FrameExporter
from eigenwatch.hooks.windows import WindowTap
from eigenwatch.monitor.sidecar import tls
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from conftest import wait_for
from test_sidecar import batch, make_frames


# ---- certificates -------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    """A throwaway certificate authority that writes PEM files under `dir`."""

    def __init__(self, dir, name: str):
        self.dir, self.name = dir, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False,
                                                  key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self._write(f"{name}-ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, fname: str, data: bytes) -> str:
        path = self.dir / fname
        path.write_bytes(data)
        return str(path)

    def issue(self, cn: str, server: bool) -> tuple[str, str]:
        """(cert.pem, key.pem) of a leaf: a server cert for localhost/127.0.0.1, or a client cert."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self._write(f"{self.name}-{cn}.pem", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{self.name}-{cn}-key.pem", key_pem))


@pytest.fixture
def pki(tmp_path):
    ca, other = CA(tmp_path, "ca"), CA(tmp_path, "other")
    return {"ca": ca, "other": other, "server": ca.issue("server", True), "client": ca.issue("client", False),
            "stranger": other.issue("client", False)}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _channel(target, ca_pem=None, client=None):
    if ca_pem is None:
        return grpc.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(_read(ca_pem), *(( _read(client[1]), _read(client[0])) if client else ()))
    return grpc.secure_channel(target, creds)


def _ingest(ch, md=None, request_id="r1"):
    stub = monitor_pb2_grpc.MonitorStub(ch)
    frames = make_frames(engine_id=f"{request_id}-0123abcd", request_id=request_id)
    return stub.Ingest(iter([batch(frames)]), metadata=md, timeout=10).frames_accepted, len(frames)


def _refused(ch) -> grpc.StatusCode:
    """The status a call gets on `ch` (a handshake the server refuses ends UNAVAILABLE)."""
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return err.value.code()


def _health(ch):
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


SERVING = health_pb2.HealthCheckResponse.SERVING


# ---- TLS and mTLS ---------------------------------------------------------------------------

def test_tls_with_token_file_serves_tls_clients_and_refuses_plaintext(sidecar_factory, pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")  # as `echo` writes it: the one trailing newline is not the token's
    cert, key = pki["server"]
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1", "--tls-cert", cert, "--tls-key", key,
                         "--token-file", str(token_file))
    with _channel(sc.grpc, pki["ca"].pem) as ch:
        assert _health(ch) == SERVING  # health stays open for probes
        accepted, sent = _ingest(ch, (("authorization", "Bearer s3cret-token"),))
        assert accepted == sent
        with pytest.raises(grpc.RpcError) as err:
            _ingest(ch, (("authorization", "Bearer s3cret-tok"),))  # a prefix is not the token
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A plaintext client cannot talk to a TLS port at all.
    with _channel(sc.grpc) as ch:
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA refuses the server's certificate.
    with _channel(sc.grpc, pki["other"].pem) as ch:
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_client_ca(sidecar_factory, pki):
    cert, key = pki["server"]
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1", "--tls-cert", cert, "--tls-key", key,
                         "--tls-client-ca", pki["ca"].pem)
    with _channel(sc.grpc, pki["ca"].pem, pki["client"]) as ch:
        accepted, sent = _ingest(ch)  # mTLS is the authentication: no token needed
        assert accepted == sent
    with _channel(sc.grpc, pki["ca"].pem) as ch:  # no client certificate
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE
    with _channel(sc.grpc, pki["ca"].pem, pki["stranger"]) as ch:  # a client certificate from another CA
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE
    with _channel(sc.grpc) as ch:
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_renewed_certificate_files_are_served_without_a_restart(sidecar_factory, pki, tmp_path):
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(_read(pki["server"][0]))
    key_path.write_bytes(_read(pki["server"][1]))
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1", "--tls-cert", str(cert_path),
                         "--tls-key", str(key_path))
    with _channel(sc.grpc, pki["ca"].pem) as ch:
        assert _health(ch) == SERVING
    # Rotation as a secret update does it: new files renamed over the old ones.
    new_cert, new_key = pki["other"].issue("server", True)
    for src, dst in ((new_key, key_path), (new_cert, cert_path)):
        tmp = dst.with_suffix(".new")
        tmp.write_bytes(_read(src))
        os.replace(tmp, dst)
    with _channel(sc.grpc, pki["other"].pem) as ch:
        assert _health(ch) == SERVING
    with _channel(sc.grpc, pki["ca"].pem) as ch:  # the old CA no longer vouches for what is served
        assert _refused(ch) == grpc.StatusCode.UNAVAILABLE
    # A half-written rotation (garbage in the certificate) keeps the last good certificate.
    cert_path.write_text("not a certificate")
    with _channel(sc.grpc, pki["other"].pem) as ch:
        assert _health(ch) == SERVING


def test_tap_exporter_delivers_frames_over_mtls_with_settings_from_the_environment(sidecar_factory, pki, tmp_path,
                                                                                    monkeypatch):
    cert, key = pki["server"]
    (tmp_path / "tok").write_text("tap-token\n")
    monkeypatch.setenv("EIGENWATCH_TOKEN", "tap-token")
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1", "--tls-cert", cert, "--tls-key", key,
                         "--tls-client-ca", pki["ca"].pem)
    monkeypatch.delenv("EIGENWATCH_TOKEN")
    monkeypatch.setenv("EIGENWATCH_TOKEN_FILE", str(tmp_path / "tok"))
    monkeypatch.setenv("EIGENWATCH_TLS_CA", pki["ca"].pem)
    monkeypatch.setenv("EIGENWATCH_TLS_CERT", pki["client"][0])
    monkeypatch.setenv("EIGENWATCH_TLS_KEY", pki["client"][1])
    # The sidecar's certificate names localhost; connect by IP and check that name.
    monkeypatch.setenv("EIGENWATCH_TLS_SERVER_NAME", "localhost")
    good = FrameExporter(sc.grpc, "m")
    monkeypatch.setenv("EIGENWATCH_TLS_CERT", pki["stranger"][0])
    monkeypatch.setenv("EIGENWATCH_TLS_KEY", pki["stranger"][1])
    bad = FrameExporter(sc.grpc, "m", max_batches=4)
    try:
        for exporter, rid in ((good, "t"), (bad, "u")):
            seeds = []
            tap = WindowTap(16, 8, 4, seeds.append)
            tap.begin(f"{rid}-0123abcd", external_id=rid)
            tap.add_layer(1, torch.randn(16, 8), [(f"{rid}-0123abcd", 0, 16)], 1)
            tap.finish(f"{rid}-0123abcd", 2)
            t0 = time.monotonic()
            exporter.submit(seeds)
            assert time.monotonic() - t0 < 0.5  # never blocks the host, whatever the handshake does
        md = (("authorization", "Bearer tap-token"),)
        with _channel(sc.grpc, pki["ca"].pem, pki["client"]) as ch:
            stub = monitor_pb2_grpc.MonitorStub(ch)

            def report(rid):
                try:
                    return stub.GetReport(monitor_pb2.GetReportRequest(request_id=rid), metadata=md, timeout=5)
                except grpc.RpcError:
                    return None

            rep = wait_for(lambda: report("t"), what="frames over mTLS")
            assert rep.finished and rep.layers[0].frames >= 1
            # The stranger's certificate never gets through: its frames are dropped and counted.
            wait_for(lambda: bad.stats()["frames_dropped"] >= 1, what="drops behind a refused handshake")
            assert not bad.connected and report("u") is None
        assert good.connected
    finally:
        good.close(timeout=1)
        bad.close(timeout=1)


# ---- settings checked at start ------------------------------------------------------------

def _sidecar(args, env_changes=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIGENWATCH_")}
    env.update(env_changes or {})
    return subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "sidecar", "--metrics-port", "-1", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("env,file_text,expect", [
    ({"EIGENWATCH_TOKEN": ""}, None, "EIGENWATCH_TOKEN: is set but empty"),
    ({"EIGENWATCH_TOKEN": "hunter2\n"}, None, "EIGENWATCH_TOKEN: contains whitespace or a newline"),
    ({"EIGENWATCH_TOKEN": "hun ter2"}, None, "EIGENWATCH_TOKEN: contains whitespace"),
    ({}, "", "--token-file: {path} is empty"),
    ({}, "\n", "--token-file: {path} is empty"),
    ({}, "hunter2\n\n", "--token-file: {path} contains whitespace or a newline"),
    ({}, " hunter2\n", "--token-file: {path} contains whitespace"),
    ({"EIGENWATCH_TOKEN": "hunter2"}, "hunter2\n", "--token-file and EIGENWATCH_TOKEN are both set"),
])
def test_unusable_tokens_stop_the_sidecar_with_a_clear_message(tmp_path, env, file_text, expect):
    args = ["--listen", "127.0.0.1:0"]
    path = tmp_path / "token"
    if file_text is not None:
        path.write_text(file_text)
        args += ["--token-file", str(path)]
    out = _sidecar(args, env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert expect.format(path=path) in out.stderr
    assert "Traceback" not in out.stderr
    assert "hunter2" not in out.stderr + out.stdout  # the token is never echoed


def test_token_file_missing_is_a_clear_error(tmp_path):
    out = _sidecar(["--listen", "127.0.0.1:0", "--token-file", str(tmp_path / "nope")])
    assert out.returncode == 2 and f"--token-file: cannot read {tmp_path / 'nope'}" in out.stderr
    assert "Traceback" not in out.stderr


def test_tls_flag_errors_name_the_flag(pki, tmp_path):
    cert, key = pki["server"]
    other_cert, _ = pki["ca"].issue("elsewhere", True)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    for args, expect in (
        (["--tls-cert", cert], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", pki["ca"].pem], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", other_cert, "--tls-key", key], "--tls-cert/--tls-key:"),
        (["--tls-cert", str(junk), "--tls-key", key], f"--tls-cert: {junk} is not a PEM file"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(tmp_path / "no.pem")], "--tls-client-ca: cannot read"),
    ):
        out = _sidecar(["--listen", "127.0.0.1:0", *args])
        assert out.returncode == 2 and expect in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_non_loopback_listen_needs_auth_or_an_explicit_override(sidecar_factory, monkeypatch, pki):
    out = _sidecar(["--listen", "0.0.0.0:0"])
    assert out.returncode == 2
    msg = out.stderr
    assert "--listen 0.0.0.0:0: refusing to serve a non-loopback address without authentication" in msg
    for how in ("--token-file FILE", "EIGENWATCH_TOKEN", "--tls-client-ca", "--allow-insecure-listen"):
        assert how in msg
    assert "Traceback" not in msg
    # TLS alone authenticates nobody: still refused.
    cert, key = pki["server"]
    out = _sidecar(["--listen", "[::]:0", "--tls-cert", cert, "--tls-key", key])
    assert out.returncode == 2 and "refusing to serve a non-loopback address" in out.stderr
    # Each way out starts it.
    for args, env in ((["--allow-insecure-listen"], {}), ([], {"EIGENWATCH_TOKEN": "tok"}),
                      (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", pki["ca"].pem], {})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        sc = sidecar_factory("--listen", "0.0.0.0:0", "--metrics-port", "-1", *args)
        assert sc.alive()
        sc.stop()
        for k in env:
            monkeypatch.delenv(k)


@pytest.mark.parametrize("listen,local", [
    ("127.0.0.1:1", True), ("127.8.0.1:1", True), ("localhost:1", True), ("[::1]:1", True),
    ("unix:///tmp/x.sock", True), ("0.0.0.0:1", False), ("[::]:1", False), (":1", False),
    ("10.0.0.5:1", False), ("sidecar.example:1", False),
])
def test_which_addresses_count_as_local(listen, local):
    assert tls.is_local(listen) is local


def test_unix_socket_is_owner_only_whatever_the_umask(sidecar_factory, tmp_path):
    sock = tmp_path / "ew.sock"
    old = os.umask(0)  # the child inherits a umask that would make the socket world-writable
    try:
        sc = sidecar_factory("--listen", f"unix://{sock}", "--metrics-port", "-1")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(sock).st_mode)
    assert mode == 0o600, oct(mode)
    with grpc.insecure_channel(sc.grpc) as ch:
        assert _health(ch) == SERVING


def test_client_settings_from_the_environment_are_checked(tmp_path):
    (tmp_path / "t").write_text("abc\n")
    assert ClientSecurity.from_env({"EIGENWATCH_TOKEN_FILE": str(tmp_path / "t")}).token == "abc"
    assert "abc" not in repr(ClientSecurity(token="abc"))
    for env, expect in (
        ({"EIGENWATCH_TOKEN": ""}, "EIGENWATCH_TOKEN: is set but empty"),
        ({"EIGENWATCH_TOKEN": "a b"}, "EIGENWATCH_TOKEN: contains whitespace"),
        ({"EIGENWATCH_TOKEN": "a", "EIGENWATCH_TOKEN_FILE": str(tmp_path / "t")}, "both set"),
        ({"EIGENWATCH_TLS_CERT": str(tmp_path / "t")}, "EIGENWATCH_TLS_CERT and EIGENWATCH_TLS_KEY go together"),
        ({"EIGENWATCH_TLS_CA": str(tmp_path / "missing")}, "EIGENWATCH_TLS_CA: cannot read"),
    ):
        with pytest.raises(ValueError, match=expect):
            ClientSecurity.from_env(env)
