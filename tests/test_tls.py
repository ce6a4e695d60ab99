"""HTTPS with an internal CA: ARGUS_CA_BUNDLE, REQUESTS_CA_BUNDLE and SSL_CERT_FILE."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading

import pytest

import argus
from conftest import FakeArgus

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A throwaway CA and a certificate for 127.0.0.1 signed by it (made once per module)."""
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca_crt = folder / "ca.key", folder / "ca.pem"
    key, csr, crt, ext = folder / "srv.key", folder / "srv.csr", folder / "srv.pem", folder / "ext"
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    # RFC 5280 extensions: Python 3.13 verifies strictly (VERIFY_X509_STRICT) and refuses a CA
    # without keyUsage or a leaf without authorityKeyIdentifier.
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt),
        "-days", "2", "-subj", "/CN=argus test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return str(ca_crt), str(crt), str(key)


@pytest.fixture
def tls_fake(certificates):
    """FakeArgus behind TLS with the certificate above."""
    ca_crt, crt, key = certificates
    server = FakeArgus()
    server.server.shutdown()  # restart the same server with TLS on its socket
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = server.url.replace("http://", "https://")
    yield server, ca_crt
    server.close()


@pytest.mark.parametrize("transport", ["urllib", "requests"])
@pytest.mark.parametrize("variable", ["ARGUS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_an_internal_ca_is_trusted_through_the_environment(tls_fake, monkeypatch, transport, variable):
    if transport == "requests":
        pytest.importorskip("requests")
    server, ca = tls_fake
    for name in ("ARGUS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)  # the machine may set some of them
    monkeypatch.setenv("ARGUS_TRANSPORT", transport)
    monkeypatch.setenv(variable, ca)
    with argus.ExperimentReporter(server.url, "tls") as rep:
        rep.batch_start("t", 1)
    assert len(server.of_type("batch_start")) == 1
    assert rep.spill.spilled == 0


@pytest.mark.parametrize("transport", ["urllib", "requests"])
def test_an_unknown_ca_is_refused_and_events_are_kept(tls_fake, monkeypatch, transport, spill_dir):
    if transport == "requests":
        pytest.importorskip("requests")
    server, _ca = tls_fake
    for name in ("ARGUS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)  # the default trust store only
    monkeypatch.setenv("ARGUS_TRANSPORT", transport)
    monkeypatch.setattr(argus, "RETRY_ATTEMPTS", 1)
    with argus.ExperimentReporter(server.url, "tls") as rep:
        rep.batch_start("t", 1)
    assert server.events == {}
    assert rep.spill.spilled == 1


def test_a_missing_ca_bundle_file_is_a_logged_network_failure_not_a_crash(tls_fake, monkeypatch, caplog):
    server, _ca = tls_fake
    monkeypatch.setenv("ARGUS_TRANSPORT", "urllib")
    monkeypatch.setenv("ARGUS_CA_BUNDLE", "/nonexistent/ca.pem")
    monkeypatch.setattr(argus, "RETRY_ATTEMPTS", 1)
    with argus.ExperimentReporter(server.url, "tls") as rep:
        rep.batch_start("t", 1)
    assert rep.spill.spilled == 1  # kept for later, the worker survived
    assert any("/nonexistent/ca.pem" in r.getMessage() for r in caplog.records)


class _TunnelProxy:
    """A CONNECT proxy on 127.0.0.1 that records the targets it tunnels to."""

    def __init__(self):
        import select
        import socket
        import socketserver

        self.targets = []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                method, target = head.split(b" ")[:2]
                if method != b"CONNECT":
                    self.request.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                    return
                proxy.targets.append(target.decode())
                host, port = target.decode().rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)), timeout=10)
                self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                sockets = [self.request, upstream]
                try:
                    while True:
                        readable, _, _ = select.select(sockets, [], [], 10)
                        if not readable:
                            return
                        for sock in readable:
                            data = sock.recv(65536)
                            if not data:
                                return
                            (upstream if sock is self.request else self.request).sendall(data)
                finally:
                    upstream.close()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("transport", ["urllib", "requests"])
def test_https_goes_through_a_connect_proxy(tls_fake, monkeypatch, transport):
    if transport == "requests":
        pytest.importorskip("requests")
    server, ca = tls_fake
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = _TunnelProxy()
    try:
        monkeypatch.setenv("ARGUS_TRANSPORT", transport)
        monkeypatch.setenv("ARGUS_CA_BUNDLE", ca)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        with argus.ExperimentReporter(server.url, "proxied") as rep:
            rep.batch_start("t", 1)
            rep.job_start("j")
    finally:
        proxy.close()
    assert proxy.targets and set(proxy.targets) == {server.url.replace("https://", "")}
    assert len(server.of_type("batch_start")) == 1 and len(server.of_type("job_start")) == 1
