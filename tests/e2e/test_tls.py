"""TLS and mutual TLS on the gateway port, as real processes, with certificates made here.

A test CA signs a server certificate for 127.0.0.1/localhost and a client
certificate; an unrelated CA signs another client certificate. Gateways are
started in front of the session's stack with ``STRATA_TLS_*`` pointing at
those files.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from devstack.ports import free_port
from tests.conftest import PROJECT_ROOT
from tests.support.calls import bearer
from tests.support.errors import error_info
from tests.support.pki import Authority, write_cert, write_key
from tests.support.stack import Stack, run_to_exit, start_gateway, stop_process

pytestmark = pytest.mark.e2e

GRPCURL = PROJECT_ROOT / ".venv" / "bin" / "grpcurl"
CALL_TIMEOUT_S = 10.0


# -- certificates ------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files the tests use."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority.create("Strata test CA")
    server_key, server_cert = ca.issue(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))],
    )
    client_key, client_cert = ca.issue("strata-test-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    other = Authority.create("Unrelated CA")
    other_key, other_cert = other.issue("strata-test-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=write_cert(folder / "ca.crt", ca.cert),
        server_cert=write_cert(folder / "server.crt", server_cert),
        server_key=write_key(folder / "server.key", server_key),
        client_cert=write_cert(folder / "client.crt", client_cert),
        client_key=write_key(folder / "client.key", client_key),
        other_ca=write_cert(folder / "other-ca.crt", other.cert),
        other_client_cert=write_cert(folder / "other-client.crt", other_cert),
        other_client_key=write_key(folder / "other-client.key", other_key),
    )


# -- gateways ----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tls_port(stack: Stack, pki: Pki) -> AsyncIterator[int]:
    """A gateway serving TLS (no client certificates asked for)."""
    process, port = await start_gateway(
        stack, STRATA_TLS_CERT_FILE=str(pki.server_cert), STRATA_TLS_KEY_FILE=str(pki.server_key)
    )
    try:
        yield port
    finally:
        await stop_process(process)


@pytest.fixture(scope="module")
async def mtls_port(stack: Stack, pki: Pki) -> AsyncIterator[int]:
    """A gateway serving mutual TLS: client certificates signed by the test CA are required."""
    process, port = await start_gateway(
        stack,
        STRATA_TLS_CERT_FILE=str(pki.server_cert),
        STRATA_TLS_KEY_FILE=str(pki.server_key),
        STRATA_TLS_CLIENT_CA_FILE=str(pki.ca),
    )
    try:
        yield port
    finally:
        await stop_process(process)


@pytest.fixture
def namespace() -> str:
    return f"tls-{uuid.uuid4().hex[:10]}"


def secure(
    port: int, root: Path, cert: Path | None = None, key: Path | None = None, host: str = "127.0.0.1"
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root.read_bytes(),
        private_key=key.read_bytes() if key is not None else None,
        certificate_chain=cert.read_bytes() if cert is not None else None,
    )
    return grpc.aio.secure_channel(f"{host}:{port}", credentials)


async def put_then_get(channel: grpc.aio.Channel, api_key: str, namespace: str) -> None:
    stub = kv_pb2_grpc.KvServiceStub(channel)
    put = await stub.Put(
        kv_pb2.PutRequest(namespace=namespace, key="k", value=b"over tls"),
        metadata=bearer(api_key),
        timeout=CALL_TIMEOUT_S,
    )
    got = await stub.Get(
        kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=bearer(api_key), timeout=CALL_TIMEOUT_S
    )
    assert got.kv.value == b"over tls"
    assert got.kv.mod_revision == put.header.revision > 0


async def refused_code(channel: grpc.aio.Channel, api_key: str, namespace: str) -> grpc.StatusCode:
    """The code a Get over ``channel`` fails with (the test fails if it succeeds)."""
    stub = kv_pb2_grpc.KvServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(
            kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=bearer(api_key), timeout=CALL_TIMEOUT_S
        )
    return caught.value.code()


# -- TLS -----------------------------------------------------------------------------


async def test_a_tls_client_that_trusts_the_ca_puts_and_gets(tls_port, pki, stack, namespace):
    async with secure(tls_port, pki.ca) as channel:
        await put_then_get(channel, stack.api_key, namespace)


async def test_the_server_certificate_also_matches_localhost(tls_port, pki, stack, namespace):
    async with secure(tls_port, pki.ca, host="localhost") as channel:
        await put_then_get(channel, stack.api_key, namespace)


async def test_health_is_served_over_tls(tls_port, pki):
    async with secure(tls_port, pki.ca) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_does_not_replace_the_api_key(tls_port, pki, namespace):
    async with secure(tls_port, pki.ca) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kv_pb2_grpc.KvServiceStub(channel).Get(
                kv_pb2.GetRequest(namespace=namespace, key="k"), timeout=CALL_TIMEOUT_S
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "MISSING_API_KEY"


async def test_a_plaintext_client_cannot_call_the_tls_port(tls_port, stack, namespace):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_port}") as channel:
        assert await refused_code(channel, stack.api_key, namespace) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_port, pki, stack, namespace):
    async with secure(tls_port, pki.other_ca) as channel:
        assert await refused_code(channel, stack.api_key, namespace) == grpc.StatusCode.UNAVAILABLE


# -- mutual TLS ----------------------------------------------------------------------


async def test_mtls_a_client_with_a_ca_signed_certificate_puts_and_gets(mtls_port, pki, stack, namespace):
    async with secure(mtls_port, pki.ca, pki.client_cert, pki.client_key) as channel:
        await put_then_get(channel, stack.api_key, namespace)


async def test_mtls_a_client_without_a_certificate_is_refused(mtls_port, pki, stack, namespace):
    async with secure(mtls_port, pki.ca) as channel:
        assert await refused_code(channel, stack.api_key, namespace) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_a_client_with_a_certificate_from_another_ca_is_refused(mtls_port, pki, stack, namespace):
    async with secure(mtls_port, pki.ca, pki.other_client_cert, pki.other_client_key) as channel:
        assert await refused_code(channel, stack.api_key, namespace) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_a_plaintext_client_is_refused(mtls_port, stack, namespace):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mtls_port}") as channel:
        assert await refused_code(channel, stack.api_key, namespace) == grpc.StatusCode.UNAVAILABLE


async def grpcurl_mtls(pki: Pki, port: int, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        "-cacert",
        str(pki.ca),
        "-cert",
        str(pki.client_cert),
        "-key",
        str(pki.client_key),
        *args[:-1],
        f"127.0.0.1:{port}",
        args[-1],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_grpcurl_lists_and_calls_through_mutual_tls(mtls_port, pki, stack, namespace):
    code, out, err = await grpcurl_mtls(pki, mtls_port, "list")
    assert code == 0, out + err
    assert {"strata.kv.v1.KvService", "strata.admin.v1.ApiKeyService", "grpc.health.v1.Health"} <= set(
        out.split()
    )

    code, out, err = await grpcurl_mtls(
        pki,
        mtls_port,
        "-H",
        f"authorization: Bearer {stack.api_key}",
        "-d",
        f'{{"namespace":"{namespace}","key":"absent"}}',
        "strata.kv.v1.KvService/Get",
    )
    assert code == 64 + grpc.StatusCode.NOT_FOUND.value[0], out + err  # grpcurl: 64 + the status code
    assert "Code: NotFound" in err
    assert "KEY_NOT_FOUND" in err


# -- configuration -------------------------------------------------------------------


def run_gateway(stack: Stack, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m gateway`` with the stack's environment plus ``extra``, to its exit."""
    return run_to_exit("gateway", {**stack.env, "STRATA_GATEWAY_PORT": str(free_port()), **extra})


def test_a_missing_certificate_file_exits_with_code_2_naming_the_variable(stack, pki, tmp_path):
    missing = tmp_path / "no-such-cert.pem"
    result = run_gateway(stack, STRATA_TLS_CERT_FILE=str(missing), STRATA_TLS_KEY_FILE=str(pki.server_key))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "STRATA_TLS_CERT_FILE" in result.stderr
    assert str(missing) in result.stderr
    assert "READY" not in result.stdout


async def start_or_exit(stack: Stack, **extra: str) -> tuple[int | None, str]:
    """Start ``python -m gateway``; (None, "") if it got ready (then stopped), else (exit code, stderr)."""
    env = {**stack.env, "STRATA_GATEWAY_PORT": str(free_port()), **extra}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        env=env,
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = await asyncio.wait_for(process.stdout.readline(), 30)
    if first.startswith(b"READY gateway"):
        await stop_process(process)
        return None, ""
    _, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, err.decode(errors="replace")


@pytest.mark.parametrize(
    ("given", "named"),
    [
        (("STRATA_TLS_CERT_FILE",), "STRATA_TLS_KEY_FILE"),
        (("STRATA_TLS_KEY_FILE",), "STRATA_TLS_CERT_FILE"),
        (("STRATA_TLS_CLIENT_CA_FILE",), "STRATA_TLS_CERT_FILE"),
    ],
)
async def test_incomplete_tls_settings_exit_with_code_2_naming_the_missing_variable(stack, pki, given, named):
    files = {
        "STRATA_TLS_CERT_FILE": pki.server_cert,
        "STRATA_TLS_KEY_FILE": pki.server_key,
        "STRATA_TLS_CLIENT_CA_FILE": pki.ca,
    }
    code, err = await start_or_exit(stack, **{name: str(files[name]) for name in given})
    assert code is not None, "the gateway started without TLS"
    assert code == 2, err
    assert named in err
