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
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)

    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(), tls_cert=str(cert), tls_key=str(key)) as (gw, _):
            out = await generate(gw.address, "hi", max_tokens=3, tls_ca=str(cert), tls_server_name="localhost",
                                 timeout_s=10)
            assert len(out.token_ids) == 3
            with pytest.raises(grpc.aio.AioRpcError) as err:   # a plaintext client cannot talk to it
                await generate(gw.address, "hi", max_tokens=3, timeout_s=5)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    run(body())
