"""TLS and mutual TLS against the fake gateway, with certificates made here by openssl."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from pagedserve import errors
from pagedserve.client import AsyncClient, Client, RetryPolicy, TLSConfig
from pagedserve.client.options import ClientOptions, is_loopback
from tests.client.fake_gateway import FakeServer

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None,
    reason="needs the openssl command to make test certificates (the cryptography package is "
           "not a dependency of this project)")

ONCE = RetryPolicy(max_attempts=1)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def _leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=directory)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("certs")
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _leaf(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost,"
          "DNS:gateway.test\nextendedKeyUsage=serverAuth\n")
    _leaf(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(directory, "named", "ca", "subjectAltName=DNS:gateway.test\n"
          "extendedKeyUsage=serverAuth\n")
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix in (".pem", ".key")}


def _server(certs, require_client_auth: bool, name: str = "server") -> FakeServer:
    credentials = grpc.ssl_server_credentials(
        [(certs[f"{name}.key"], certs[f"{name}.pem"])],
        root_certificates=certs["ca.pem"] if require_client_auth else None,
        require_client_auth=require_client_auth)
    return FakeServer(credentials=credentials)


def test_tls(certs):
    server = _server(certs, require_client_auth=False)
    try:
        with Client(server.address, tls=TLSConfig(root_certificates=certs["ca.pem"]),
                    api_key="t") as client:
            assert client.tokenize("ok") == [111, 107]
        # Not trusting the server's CA fails; so does plaintext against a TLS port.
        for tls in (TLSConfig(root_certificates=certs["other-ca.pem"]), False):
            client = Client(server.address, tls=tls, retry=ONCE, timeout=10)
            with client, pytest.raises(errors.Unavailable):
                client.tokenize("no")
    finally:
        server.stop()
    assert server.servicer.calls[0].metadata["authorization"] == "Bearer t"
    assert len(server.servicer.calls) == 1


def test_tls_server_name_override(certs, tmp_path):
    """A certificate for gateway.test only: 127.0.0.1 fails the name check unless overridden."""
    server = _server(certs, require_client_auth=False, name="named")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(certs["ca.pem"])
    try:
        client = Client(server.address, tls=TLSConfig(root_certificates=str(ca_file)),
                        retry=ONCE, timeout=10)
        with client, pytest.raises(errors.Unavailable):
            client.load()
        tls = TLSConfig(root_certificates=str(ca_file), server_name="gateway.test")
        with Client(server.address, tls=tls) as client:
            assert client.load().num_running == 3
    finally:
        server.stop()
    assert len(server.servicer.calls) == 1


def test_mutual_tls(certs):
    server = _server(certs, require_client_auth=True)
    mtls = TLSConfig(root_certificates=certs["ca.pem"], certificate_chain=certs["client.pem"],
                     private_key=certs["client.key"])
    try:
        with Client(server.address, tls=mtls) as client:
            assert client.generate("x").request_id == "req-1"
        client = Client(server.address, tls=TLSConfig(root_certificates=certs["ca.pem"]),
                    retry=ONCE, timeout=10)
        with client, pytest.raises(errors.Unavailable):
            client.generate("no client certificate")

        async def with_async_client():
            async with AsyncClient(server.address, tls=mtls) as client:
                return [e async for e in client.generate_stream("p")]

        assert asyncio.run(with_async_client())[-1].finish_reasons == ["stop", "length"]
    finally:
        server.stop()
    assert [c.method for c in server.servicer.calls] == ["Generate", "GenerateStream"]


def test_tls_config_checks():
    with pytest.raises(errors.InvalidArgument, match="together"):
        TLSConfig(certificate_chain=b"x")
    with pytest.raises(errors.InvalidType):
        TLSConfig(root_certificates=42)


def test_plaintext_only_to_loopback_by_default():
    for target in ("127.0.0.1:1", "localhost:50051", "[::1]:8", "127.9.9.9:1",
                   "unix:/tmp/sock", "dns:///localhost:5"):
        assert is_loopback(target), target
    for target in ("10.0.0.1:50051", "gateway.example:443", "[2001:db8::1]:1", "dns:///a:1"):
        assert not is_loopback(target), target
    options = ClientOptions.create(["127.0.0.1:1", "gateway.example:443"])
    assert options.tls_for("127.0.0.1:1") is None
    assert options.tls_for("gateway.example:443") == TLSConfig()
    assert ClientOptions.create("gateway.example:443", tls=False).tls_for("x:1") is None
    assert ClientOptions.create("127.0.0.1:1", tls=True).tls_for("127.0.0.1:1") == TLSConfig()
