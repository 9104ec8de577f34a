"""Optional bearer token and TLS on the gateway, through real gRPC calls."""
import shutil
import subprocess

import grpc
import pytest

from pearl_runtime.client import generate, list_models
from tests.gateway.fake_target import FakeTarget
from tests.gateway.harness import gateway_over, run


def test_bearer_token_is_required_when_set(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(), auth_token="s3cret") as (gw, _):
            for token in (None, "wrong"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await generate(gw.address, "hi", max_tokens=3, auth_token=token, timeout_s=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await list_models(gw.address, auth_token=token)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            out = await generate(gw.address, "hi", max_tokens=3, auth_token="s3cret", timeout_s=10)
            assert len(out.token_ids) == 3
    run(body())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(tokenizer_dir, tmp_path):
    cert, key = _self_signed(tmp_path)

    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(), tls_cert=str(cert), tls_key=str(key)) as (gw, _):
            out = await generate(gw.address, "hi", max_tokens=3, tls_ca=str(cert), tls_server_name="localhost",
                                 timeout_s=10)
            assert len(out.token_ids) == 3
            with pytest.raises(grpc.aio.AioRpcError) as err:   # a plaintext client cannot talk to it
                await generate(gw.address, "hi", max_tokens=3, timeout_s=5)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    run(body())


def _self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_health_port_answers_plaintext_probes_while_the_port_speaks_tls(tokenizer_dir, tmp_path):
    """kubelet's gRPC probes speak plaintext: --health-port serves grpc.health.v1 alone there,
    with the same states as the TLS port, and nothing else."""
    from pearl_runtime.rpc.health import check
    from tests.services.procs import free_port
    cert, key = _self_signed(tmp_path)
    health_port = free_port()

    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(), tls_cert=str(cert), tls_key=str(key),
                                health_port=health_port) as (gw, _):
            plain = f"127.0.0.1:{health_port}"
            assert await check(plain) == "SERVING"
            assert await check(plain, "liveness") == "SERVING"
            assert await check(gw.address) == "UNREACHABLE"      # the TLS port refuses plaintext
            assert await check(gw.address, credentials=grpc.ssl_channel_credentials(cert.read_bytes())) == "SERVING"
            with pytest.raises(grpc.aio.AioRpcError) as err:     # health alone: no Generate there
                await generate(plain, "hi", max_tokens=3, timeout_s=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            await gw.readiness.stopping()
            assert await check(plain) == "NOT_SERVING"
        assert await check(f"127.0.0.1:{health_port}", timeout_s=1) == "UNREACHABLE"   # closed with the gateway
    run(body())
