"""Bearer tokens, TLS and mutual TLS on the public server, over raw gRPC.

Three Servers, one per class (class-scoped: two Servers cannot share the Ray cluster at once).
Certificates are made here: a CA, a server certificate for 127.0.0.1/localhost and a client
certificate, with the `cryptography` package when it is importable, else the `openssl` CLI.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.cluster.launcher import ServeOptions
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.gateway.gateway_utils import collect_stream, ids_request, rpc_error, started_server

pytestmark = pytest.mark.timeout(90)

TOKEN = "s3cret"
PROMPT = [5, 6, 7, 8]


def tiny_config(path: str) -> EngineConfig:
    return EngineConfig(model=path, device="cpu", num_gpu_blocks_override=64, cpu_threads=1)


# ---- certificates -------------------------------------------------------------------------------

def _with_cryptography(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write(stem: str, key, certificate) -> None:
        (directory / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (directory / f"{stem}.pem").write_bytes(certificate.public_bytes(
            serialization.Encoding.PEM))

    def builder(subject: str, issuer: x509.Name, key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder("pagedserve test CA", name("pagedserve test CA"), ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    import ipaddress

    for stem, usage, sans in (
            ("server", ExtendedKeyUsageOID.SERVER_AUTH,
             [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("test-client")])):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (builder(sans[-1].value, ca.subject, key)
                       .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                      critical=True)
                       .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                       .sign(ca_key, hashes.SHA256()))
        write(stem, key, certificate)


def _with_openssl(directory: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True,
                       timeout=60)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=pagedserve test CA",
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
    for stem, usage, sans in (("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
                              ("client", "clientAuth", "DNS:test-client")):
        (directory / f"{stem}.ext").write_text(
            f"basicConstraints=critical,CA:FALSE\nsubjectAltName={sans}\n"
            f"extendedKeyUsage={usage}\n")
        run("req", *curve, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
            "-subj", f"/CN={stem}")
        run("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", "0x" + ("1" if stem == "server" else "2") * 16, "-days", "2",
            "-sha256", "-extfile", f"{stem}.ext", "-out", f"{stem}.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca / server / client .pem (certificate) and .key paths."""
    directory = tmp_path_factory.mktemp("gateway-pki")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available "
                        "to make test certificates")
        _with_openssl(directory)
    else:
        _with_cryptography(directory)
    files = {f"{stem}_{kind}": directory / f"{stem}.{kind}"
             for stem in ("ca", "server", "client") for kind in ("pem", "key")}
    assert all(path.is_file() for path in files.values())
    return files


# ---- calls --------------------------------------------------------------------------------------

async def _generate_and_stream(channel, metadata=None) -> None:
    """Both generation RPCs succeed on `channel`."""
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = ids_request(PROMPT, temperature=0.0, max_tokens=3)
    response = await stub.Generate(request, timeout=30, metadata=metadata)
    assert len(response.completions[0].token_ids) == 3
    deltas, final = await collect_stream(stub.GenerateStream(request, timeout=30,
                                                             metadata=metadata))
    assert [t for m in deltas for t in m.delta.token_ids] == list(
        response.completions[0].token_ids)
    assert final.usage.completion_tokens == 3


async def _health(channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10)
    return response.status


async def _unreachable(channel) -> grpc.aio.AioRpcError:
    """The handshake fails: the first call is UNAVAILABLE."""
    error = await rpc_error(generation_pb2_grpc.GenerationStub(channel).GetModelInfo(
        pb.GetModelInfoRequest(), timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    return error


def _credentials(pki, with_client_cert: bool) -> grpc.ChannelCredentials:
    if not with_client_cert:
        return grpc.ssl_channel_credentials(root_certificates=pki["ca_pem"].read_bytes())
    return grpc.ssl_channel_credentials(root_certificates=pki["ca_pem"].read_bytes(),
                                        private_key=pki["client_key"].read_bytes(),
                                        certificate_chain=pki["client_pem"].read_bytes())


# ---- the three Servers (class-scoped, so one runs at a time) -------------------------------------

@pytest.fixture(scope="class")
def auth_server(aio, ray_cluster, tiny_checkpoint):
    options = ServeOptions(host="127.0.0.1", port=0, auth_tokens=[TOKEN, "second-token"])
    with started_server(aio, tiny_config(tiny_checkpoint), options) as server:
        yield server


@pytest.fixture(scope="class")
def tls_server(aio, ray_cluster, tiny_checkpoint, pki):
    options = ServeOptions(host="127.0.0.1", port=0, tls_cert=str(pki["server_pem"]),
                           tls_key=str(pki["server_key"]))
    with started_server(aio, tiny_config(tiny_checkpoint), options) as server:
        yield server


@pytest.fixture(scope="class")
def mtls_server(aio, ray_cluster, tiny_checkpoint, pki):
    options = ServeOptions(host="127.0.0.1", port=0, tls_cert=str(pki["server_pem"]),
                           tls_key=str(pki["server_key"]),
                           tls_client_ca=str(pki["ca_pem"]))
    with started_server(aio, tiny_config(tiny_checkpoint), options) as server:
        yield server


# ---- bearer tokens ------------------------------------------------------------------------------

class TestBearerTokens:
    @pytest.mark.parametrize("metadata", [
        None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("x-api-key", TOKEN),)],
        ids=["none", "wrong", "no-bearer-prefix", "longer", "other-key"])
    def test_missing_or_wrong_token_is_unauthenticated(self, metadata, aio, auth_server):
        async def body():
            async with grpc.aio.insecure_channel(auth_server.address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                request = ids_request(PROMPT, max_tokens=3)
                calls = {
                    "Generate": stub.Generate(request, timeout=20, metadata=metadata),
                    "GenerateStream": stub.GenerateStream(request, timeout=20,
                                                          metadata=metadata).read(),
                    "GetModelInfo": stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=20,
                                                      metadata=metadata),
                }
                for name, call in calls.items():
                    error = await rpc_error(call)
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, error)
                    assert "bearer" in error.details().lower()

        aio.run(body(), timeout=40)

    @pytest.mark.parametrize(("scheme", "token"), [("Bearer", TOKEN), ("Bearer", "second-token"),
                                                   ("bearer", TOKEN)])  # RFC 6750: any case
    def test_right_token_works(self, scheme, token, aio, auth_server):
        async def body():
            async with grpc.aio.insecure_channel(auth_server.address) as channel:
                await _generate_and_stream(channel, (("authorization", f"{scheme} {token}"),))

        aio.run(body(), timeout=60)

    def test_health_check_needs_no_token(self, aio, auth_server):
        async def body():
            async with grpc.aio.insecure_channel(auth_server.address) as channel:
                for service in ("", "pagedserve.v1.Generation"):
                    assert await _health(channel, service) == \
                        health_pb2.HealthCheckResponse.SERVING

        aio.run(body(), timeout=20)

    def test_unknown_method_without_token_is_refused_cleanly(self, aio, auth_server):
        async def body():
            async with grpc.aio.insecure_channel(auth_server.address) as channel:
                method = channel.unary_unary("/pagedserve.v1.Generation/NoSuchMethod",
                                             request_serializer=lambda raw: raw,
                                             response_deserializer=lambda raw: raw)
                error = await rpc_error(method(b"", timeout=10))
                assert error.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                        grpc.StatusCode.UNIMPLEMENTED), (error.code(),
                                                                         error.details())

        aio.run(body(), timeout=20)


# ---- TLS ----------------------------------------------------------------------------------------

class TestTLS:
    def test_plaintext_client_fails(self, aio, tls_server):
        async def body():
            async with grpc.aio.insecure_channel(tls_server.address) as channel:
                await _unreachable(channel)

        aio.run(body(), timeout=30)

    def test_client_trusting_another_ca_fails(self, aio, tls_server, pki):
        async def body():
            # The server's own certificate is no CA: nothing it presents chains to it.
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pki["client_pem"].read_bytes())
            async with grpc.aio.secure_channel(tls_server.address, credentials) as channel:
                await _unreachable(channel)

        aio.run(body(), timeout=30)

    def test_tls_client_with_the_ca_works(self, aio, tls_server, pki):
        async def body():
            async with grpc.aio.secure_channel(tls_server.address,
                                               _credentials(pki, False)) as channel:
                await _generate_and_stream(channel)
                assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING

        aio.run(body(), timeout=60)

    def test_localhost_name_matches_the_certificate(self, aio, tls_server, pki):
        port = tls_server.address.rsplit(":", 1)[1]

        async def body():
            async with grpc.aio.secure_channel(f"localhost:{port}",
                                               _credentials(pki, False)) as channel:
                assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING

        aio.run(body(), timeout=30)


class TestMutualTLS:
    def test_tls_client_without_a_client_certificate_fails(self, aio, mtls_server, pki):
        async def body():
            async with grpc.aio.secure_channel(mtls_server.address,
                                               _credentials(pki, False)) as channel:
                await _unreachable(channel)

        aio.run(body(), timeout=30)

    def test_plaintext_client_fails(self, aio, mtls_server):
        async def body():
            async with grpc.aio.insecure_channel(mtls_server.address) as channel:
                await _unreachable(channel)

        aio.run(body(), timeout=30)

    def test_client_with_a_certificate_works(self, aio, mtls_server, pki):
        async def body():
            async with grpc.aio.secure_channel(mtls_server.address,
                                               _credentials(pki, True)) as channel:
                await _generate_and_stream(channel)

        aio.run(body(), timeout=60)
