"""Certificates for the TLS tests, made with ``openssl``: a CA of the test's own, a server
certificate for 127.0.0.1 and localhost, and a client certificate (mutual TLS), all signed
by that CA. EC keys (P-256), so making them takes milliseconds. And a private
``redis-server`` speaking TLS with them."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from queue_worker.devstack.redis import find_redis_server
from queue_worker.devstack.serve import free_port

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path  # the server's (chain: itself; the CA is the trust anchor)
    key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        """What a client trusting only this CA uses."""
        return ssl.create_default_context(cafile=str(self.ca))


def _openssl(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True)


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def _signed(directory: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> None:
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    _key(key)
    _openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", csr)
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "2", "-sha256", "-extfile", ext, "-out", directory / f"{name}.crt",
    )  # fmt: skip


def make_certs(directory: Path) -> Certs:
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _key(ca_key)
    _openssl(
        "req", "-x509", "-new", "-key", ca_key, "-subj", "/CN=queue-worker test CA",
        "-days", "2", "-sha256", "-out", ca,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _signed(
        directory,
        "server",
        ca,
        ca_key,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _signed(directory, "client", ca, ca_key, "extendedKeyUsage=clientAuth\n")
    return Certs(
        ca=ca,
        cert=directory / "server.crt",
        key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


class TlsRedis:
    """A private ``redis-server`` that speaks TLS only (``--port 0 --tls-port``), with the
    test CA's server certificate, asking clients for a certificate of that CA."""

    def __init__(self, certs: Certs, directory: Path) -> None:
        self.port = free_port()
        self.certs = certs
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> TlsRedis:
        args = [
            find_redis_server(),
            "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.certs.cert), "--tls-key-file", str(self.certs.key),
            "--tls-ca-cert-file", str(self.certs.ca), "--tls-auth-clients", "yes",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server (TLS) exited at start: {err.strip()}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server (TLS) did not answer on port {self.port}")

    def _answers(self) -> bool:
        context = self.certs.client_context()
        context.load_cert_chain(self.certs.client_cert, self.certs.client_key)
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None
