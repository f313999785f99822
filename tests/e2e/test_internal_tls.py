"""Mutual TLS on the internal hop: a whole stack launched with ``STRATA_INTERNAL_TLS_*``.

The certificates come from ``deploy/internal-certs.sh``, the script compose
users run. Every path a Strata process calls a service by is exercised: the
gateway's unary and stream connections, its key lookups, tenants' cascade
through kv and admin, admin's health checks, the launcher's dev key and the
container health check. A service port then refuses plaintext, a client with
no certificate, and a certificate from another CA, before any identity is read.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from strata.vector.v1 import vector_pb2, vector_pb2_grpc

from devstack.ports import free_port
from shared.api.callers import Caller
from shared.rpc.identity import signing_interceptors
from tests.conftest import PROJECT_ROOT, TEST_INTERNAL_SECRET
from tests.support.calls import AdminStubs, bearer
from tests.support.pki import Authority, write_cert, write_key
from tests.support.stack import Stack, remove_data, run_to_exit, start_stack

pytestmark = pytest.mark.e2e

SCRIPT = PROJECT_ROOT / "deploy" / "internal-certs.sh"
TIMEOUT_S = 10.0
CALLER = Caller("dev", frozenset({"kv:read", "kv:write"}), "internal-tls-test")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("internal") / "certs"
    made = subprocess.run([SCRIPT, str(folder)], capture_output=True, text=True, check=False, timeout=60)
    assert made.returncode == 0, made.stderr
    return folder


@pytest.fixture(scope="module")
async def tls_stack(settings, certs: Path) -> AsyncIterator[Stack]:
    stack = await start_stack(settings, **_internal_tls(certs))
    yield stack
    await stack.stop()
    remove_data(stack)


def _internal_tls(certs: Path) -> dict[str, str]:
    return {
        "STRATA_INTERNAL_TLS_CA_FILE": str(certs / "ca.pem"),
        "STRATA_INTERNAL_TLS_CERT_FILE": str(certs / "internal.pem"),
        "STRATA_INTERNAL_TLS_KEY_FILE": str(certs / "internal-key.pem"),
    }


def _secure(port: int, root: Path, cert: Path | None = None, key: Path | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root.read_bytes(),
        private_key=key.read_bytes() if key is not None else None,
        certificate_chain=cert.read_bytes() if cert is not None else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        credentials,
        interceptors=signing_interceptors(TEST_INTERNAL_SECRET.encode(), CALLER),
    )


def test_the_script_makes_a_ca_and_a_certificate_for_every_host_and_refuses_to_overwrite(certs: Path):
    text = subprocess.run(
        [
            "openssl",
            "x509",
            "-in",
            str(certs / "internal.pem"),
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("DNS:kv", "DNS:tenants", "DNS:vector", "DNS:admin", "DNS:gateway", "IP Address:127.0.0.1"):
        assert name in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text
    assert (certs.stat().st_mode & 0o777) == 0o700
    assert (certs / "ca-key.pem").stat().st_mode & 0o077 == 0
    again = subprocess.run([SCRIPT, str(certs)], capture_output=True, text=True, check=False, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    bad = subprocess.run(
        [SCRIPT, str(certs.parent / "other"), "bad name;rm"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "not a host name" in bad.stderr


async def test_calls_and_streams_cross_the_gateway_to_every_service(tls_stack: Stack):
    namespace = f"itls-{uuid.uuid4().hex[:8]}"
    metadata = bearer(tls_stack.api_key)  # the launcher made it over the internal hop
    async with grpc.aio.insecure_channel(tls_stack.gateway) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        watch = kv.Watch(
            kv_pb2.WatchRequest(namespace=namespace, prefix=""), metadata=metadata, timeout=TIMEOUT_S
        )
        assert (await watch.read()).created
        put = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"), metadata=metadata)
        got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=metadata)
        assert got.kv.value == b"v" and got.kv.mod_revision == put.header.revision
        event = (await watch.read()).events[0]
        assert (event.type, event.kv.key) == (kv_pb2.EVENT_TYPE_PUT, "k")
        watch.cancel()
        tenant = await tenants_pb2_grpc.TenantServiceStub(channel).GetTenant(
            tenants_pb2.GetTenantRequest(slug="dev"), metadata=metadata
        )
        assert tenant.tenant.slug == "dev"
        collections = await vector_pb2_grpc.VectorServiceStub(channel).ListCollections(
            vector_pb2.ListCollectionsRequest(), metadata=metadata
        )
        assert collections is not None


async def test_a_cascading_tenant_delete_reaches_kv_and_admin_over_the_hop(tls_stack: Stack):
    slug = f"itls-{uuid.uuid4().hex[:8]}"
    operator = bearer(tls_stack.api_key)
    async with grpc.aio.insecure_channel(tls_stack.gateway) as channel:
        tenants = tenants_pb2_grpc.TenantServiceStub(channel)
        admin = AdminStubs(channel)
        await tenants.CreateTenant(
            tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug)), metadata=operator
        )
        made = await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=slug, name="t", scopes=["kv:write"]), metadata=operator
        )
        kv = kv_pb2_grpc.KvServiceStub(channel)
        await kv.Put(kv_pb2.PutRequest(namespace="n", key="k", value=b"v"), metadata=bearer(made.api_key))
        await tenants.DeleteTenant(
            tenants_pb2.DeleteTenantRequest(slug=slug, cascade=True), metadata=operator
        )
        await asyncio.sleep(1.2)  # past the gateway's key cache
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kv.Put(kv_pb2.PutRequest(namespace="n", key="k", value=b"v"), metadata=bearer(made.api_key))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_system_health_checks_every_component_through_its_own_face(tls_stack: Stack):
    async with grpc.aio.insecure_channel(tls_stack.gateway) as channel:
        health = await AdminStubs(channel).GetSystemHealth(
            admin_pb2.GetSystemHealthRequest(), metadata=bearer(tls_stack.api_key)
        )
    serving = {c.component: c.status for c in health.components}
    assert set(serving) == {"kv", "tenants", "vector", "admin", "gateway"}
    assert set(serving.values()) == {admin_pb2.SERVING_STATUS_SERVING}, health


async def _refusal(channel: grpc.aio.Channel) -> grpc.StatusCode | None:
    async with channel:
        try:
            await kv_pb2_grpc.KvServiceStub(channel).Get(kv_pb2.GetRequest(namespace="n", key="k"), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return None


async def test_a_service_port_answers_only_a_client_holding_an_internal_certificate(
    tls_stack: Stack, certs: Path, tmp_path: Path
):
    port = tls_stack.ports["kv"]
    other = Authority.create("Unrelated CA")
    other_key, other_cert = other.issue("strata-internal", ExtendedKeyUsageOID.CLIENT_AUTH)
    foreign_cert = write_cert(tmp_path / "foreign.pem", other_cert)
    foreign_key = write_key(tmp_path / "foreign-key.pem", other_key)
    signed = signing_interceptors(TEST_INTERNAL_SECRET.encode(), CALLER)
    plaintext = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=signed)
    assert await _refusal(plaintext) == grpc.StatusCode.UNAVAILABLE
    assert await _refusal(_secure(port, certs / "ca.pem")) == grpc.StatusCode.UNAVAILABLE
    assert (
        await _refusal(_secure(port, certs / "ca.pem", foreign_cert, foreign_key))
        == grpc.StatusCode.UNAVAILABLE
    )
    # The internal certificate opens the connection; a signed identity is still what authorizes the call.
    holder = _secure(port, certs / "ca.pem", certs / "internal.pem", certs / "internal-key.pem")
    assert await _refusal(holder) == grpc.StatusCode.NOT_FOUND
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(
            (certs / "ca.pem").read_bytes(),
            (certs / "internal-key.pem").read_bytes(),
            (certs / "internal.pem").read_bytes(),
        ),
    ) as unsigned:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kv_pb2_grpc.KvServiceStub(unsigned).Get(
                kv_pb2.GetRequest(namespace="n", key="k"), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _healthcheck(env: dict[str, str], *args: str) -> int:
    return subprocess.run(
        [sys.executable, "-m", "shared.rpc.healthcheck", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    ).returncode


def test_the_container_health_check_calls_services_with_the_certificate_and_the_gateway_as_clients(
    tls_stack: Stack,
):
    plain = {k: v for k, v in tls_stack.env.items() if not k.startswith("STRATA_INTERNAL_TLS_")}
    for service in ("kv", "tenants", "vector", "admin"):
        assert _healthcheck(tls_stack.env, f"127.0.0.1:{tls_stack.ports[service]}") == 0, service
        assert _healthcheck(plain, f"127.0.0.1:{tls_stack.ports[service]}") == 1, service
    assert _healthcheck(tls_stack.env, "--gateway", tls_stack.gateway) == 0


@pytest.mark.parametrize("given", [("CA",), ("CERT", "KEY"), ("CA", "KEY")])
def test_half_the_internal_tls_settings_stop_a_service_at_start(tls_stack: Stack, certs: Path, given):
    files = _internal_tls(certs)
    env = {k: v for k, v in tls_stack.env.items() if not k.startswith("STRATA_INTERNAL_TLS_")}
    env.update(
        {f"STRATA_INTERNAL_TLS_{part}_FILE": files[f"STRATA_INTERNAL_TLS_{part}_FILE"] for part in given}
    )
    env["STRATA_KV_PORT"] = str(free_port())
    result = run_to_exit("services.kv", env)
    assert result.returncode == 2, result.stderr
    missing = {"CA", "CERT", "KEY"} - set(given)
    for part in missing:
        assert f"STRATA_INTERNAL_TLS_{part}_FILE" in result.stderr
    assert "READY" not in result.stdout
