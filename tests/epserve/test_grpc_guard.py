"""Every epserve gRPC server (grpc_server.serve_grpc + grpc_guard + grpc_security): the token check,
INVALID_ARGUMENT for undecodable requests, INTERNAL (never UNKNOWN) for handler errors, clipped
details, message size limits, TLS and mTLS — through real servers and the generated stubs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.grpc_guard import MAX_DETAILS_CHARS
from epserve.grpc_security import Security, ensure_token_file, open_channel, read_token_file
from epserve.grpc_server import serve_grpc
from epserve.protos import generation_pb2, generation_pb2_grpc

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
TOKEN = "s3cret-token-for-tests"


class Servicer(generation_pb2_grpc.GenerationServicer):
    def Generate(self, request, context):
        if request.text == "raise":
            raise RuntimeError("a bug in the handler")
        if request.text == "raise-later":
            yield generation_pb2.GenerateResponse(text="first")
            raise KeyError("later")
        if request.text.startswith("long"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no such thing: {request.text}")
        yield generation_pb2.GenerateResponse(text=f"echo {request.text}", finished=True)

    def Abort(self, request, context):
        if request.request_id == "raise":
            raise ValueError("unary bug")
        return generation_pb2.AbortResponse(found=True)


@pytest.fixture
def serve():
    servers = []

    def start(security: Security = Security(), **options):
        server = serve_grpc([(generation_pb2_grpc.add_GenerationServicer_to_server, Servicer(), SERVICE)],
                            "127.0.0.1", 0, security=security, **options)
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop(0)


def call(address: str, text: str, security: Security = Security()):
    with open_channel(address, security) as channel:
        request = generation_pb2.GenerateRequest(text=text)
        return [r.text for r in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=10)]


def error_of(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


def test_token_required_but_health_open(serve):
    address = serve(Security(token=TOKEN))
    assert call(address, "hi", Security(token=TOKEN)) == ["echo hi"]
    for wrong in (Security(), Security(token="wrong-token")):
        error = error_of(call, address, "hi", wrong)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in error.details()
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        unary = generation_pb2_grpc.GenerationStub(channel).Abort
        assert error_of(unary, generation_pb2.AbortRequest(request_id="x")).code() == grpc.StatusCode.UNAUTHENTICATED


def test_handler_errors_are_internal_never_unknown(serve):
    address = serve()
    for text in ("raise", "raise-later"):
        error = error_of(call, address, text)
        assert error.code() == grpc.StatusCode.INTERNAL, (text, error)
    with grpc.insecure_channel(address) as channel:
        error = error_of(generation_pb2_grpc.GenerationStub(channel).Abort,
                         generation_pb2.AbortRequest(request_id="raise"))
        assert error.code() == grpc.StatusCode.INTERNAL and "ValueError" in error.details()
    assert call(address, "still serving") == ["echo still serving"]


def test_undecodable_request_is_invalid_argument(serve):
    address = serve()
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(raw(b"\xff\xff\xff\xff garbage", timeout=5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_details_never_grow_with_the_input(serve):
    address = serve()
    error = error_of(call, address, "long" + "x" * 100_000)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(error.details()) < MAX_DETAILS_CHARS + 100


def test_message_size_limit_is_resource_exhausted(serve):
    address = serve(max_message_bytes=64 * 1024)
    error = error_of(call, address, "x" * 200_000)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_token_files(tmp_path):
    path = tmp_path / "sub" / "token"
    token = ensure_token_file(path)
    assert len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert ensure_token_file(path) == token == read_token_file(path)
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        read_token_file(path)


# -- TLS -------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by it."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=epserve-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=epserve-{name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def test_tls_round_trip(serve, pki):
    address = serve(Security(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")))
    assert call(address, "over tls", Security(tls_ca=str(pki / "ca.pem"))) == ["echo over tls"]
    assert error_of(call, address, "plaintext").code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate(serve, pki):
    server = Security(token=TOKEN, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                      tls_ca=str(pki / "ca.pem"))
    address = serve(server)
    client = Security(token=TOKEN, tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key"),
                      tls_ca=str(pki / "ca.pem"))
    assert call(address, "mutual", client) == ["echo mutual"]
    no_cert = Security(token=TOKEN, tls_ca=str(pki / "ca.pem"))
    assert error_of(call, address, "no cert", no_cert).code() == grpc.StatusCode.UNAVAILABLE


def test_security_flags_are_checked():
    with pytest.raises(ValueError, match="go together"):
        Security(tls_cert="/etc/hostname")
    with pytest.raises(ValueError, match="no such file"):
        Security(tls_ca="/nonexistent.pem")
    with pytest.raises(ValueError, match="printable ASCII"):
        Security(token="has space")
