"""Trust boundaries, real processes: with a token on every hop an unauthenticated caller gets
UNAUTHENTICATED from the target and the draft (health still answers) while the stack serves
== target-only greedy; the draft refuses out-of-bounds Rounds with INVALID_ARGUMENT and a
gateway request beside a hostile stream still finishes in its normal time; mTLS on every hop."""
import asyncio
import shutil
import subprocess
import time

import grpc
import pytest

from pearl_runtime.client import generate
from pearl_runtime.pb import draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc
from pearl_runtime.rpc import tensors
from pearl_runtime.rpc.health import check
from pearl_runtime.rpc.identity import PROTOCOL_VERSION
from pearl_runtime.rpc.security import channel, token_metadata
from tests.services.procs import GAMMA, START_TIMEOUT_S, free_port, reference_greedy, run, stop_all
from tests.tiny_models import assert_same_tokens

TOKEN = "test-secret-token"
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 60)), [3]]
MAX_TOKENS = [24, 16, 8]


@pytest.fixture(scope="module")
def refs(service_models):
    return reference_greedy(service_models[0], PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def secured(cluster, service_models):
    """draft, target (pearl) and gateway, each requiring TOKEN; the callers present it by the
    shared --auth-token alone (their --*-auth-token default to it)."""
    target_model, drafts = service_models
    auth = ["--auth-token", TOKEN]
    draft = cluster.service("draft", cluster.engine_args(drafts["copy"]) + auth, "draft-auth", log_level="info")
    target = cluster.service("target", cluster.engine_args(target_model) + auth + [
        "--mode", "pearl", "--gamma", str(GAMMA), "--draft", draft.address], "target-auth")
    gateway = cluster.service("gateway", ["--model", str(target_model), "--targets", target.address] + auth,
                              "gateway-auth")
    services = [draft, target, gateway]
    cluster.launch(services, handshakes=[draft])
    yield draft, target, gateway
    stop_all(services)


async def _status_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _stream_status(call) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_target_and_draft_refuse_unauthenticated_calls_and_health_stays_open(secured):
    draft, target, gateway = secured

    async def body():
        for svc in secured:   # the probes carry no token
            assert await check(svc.address, timeout_s=5) == "SERVING"
        async with channel(target.address) as ch:
            stub = target_pb2_grpc.TargetStub(ch)
            for meta in ((), token_metadata("wrong")):
                assert await _status_of(stub.Info(target_pb2.InfoRequest(), timeout=5, metadata=meta)) \
                    == grpc.StatusCode.UNAUTHENTICATED
                code, details = await _stream_status(stub.Serve(iter(()), timeout=5, metadata=meta))
                assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
            info = await stub.Info(target_pb2.InfoRequest(), timeout=5, metadata=token_metadata(TOKEN))
            assert info.draft_connected   # the target's own hop to the draft is authenticated
        async with channel(draft.address) as ch:
            # no message sent: the refusal rests on the metadata alone, and grpc aio's client
            # reports INTERNAL rather than the server's status when a write lands after the
            # server has ended the call (grpc/grpc#36066)
            code, details = await _stream_status(draft_pb2_grpc.DraftStub(ch).Speculate(iter(()), timeout=5))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details, (code, details)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(gateway.address, token_ids=[5, 6], max_tokens=2, timeout_s=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    run(body())
    # a draft that requires a token opens no Round datagram port (a side door beside the token)
    assert "Round datagram port open" not in draft.log()


def test_stack_with_auth_on_every_hop_equals_target_only_greedy(secured, refs):
    gateway = secured[2]

    async def body():
        return await asyncio.gather(*(generate(gateway.address, token_ids=p, max_tokens=m, ignore_eos=True,
                                               auth_token=TOKEN, timeout_s=120)
                                      for p, m in zip(PROMPTS, MAX_TOKENS)))
    for i, (done, ref) in enumerate(zip(run(body()), refs)):
        assert_same_tokens(done.token_ids, ref, label=f"request {i}: ")
        assert done.stats.mode == "pearl"


def _hello(info: target_pb2.ModelInfo) -> draft_pb2.ToDraft:
    return draft_pb2.ToDraft(hello=draft_pb2.Hello(
        target_id="rogue", tokenizer_hash=info.tokenizer_hash, vocab_size=info.vocab_size,
        protocol_version=PROTOCOL_VERSION))


def _round(round_id: int, gamma: int, adds=(), verdicts=None) -> draft_pb2.ToDraft:
    rnd = draft_pb2.Round(round_id=round_id, gamma=gamma,
                          adds=[draft_pb2.SeqAdd(seq_id=s, token_ids=ids) for s, ids in adds])
    if verdicts:
        rnd.verdicts.CopyFrom(tensors.encode_ints(verdicts, "int64"))
    return draft_pb2.ToDraft(round=rnd)


async def _rogue(draft_address: str, info, messages) -> tuple[grpc.StatusCode, str]:
    """One Speculate stream straight to the draft (the token stolen): Hello, then `messages`."""
    async with channel(draft_address) as ch:
        call = draft_pb2_grpc.DraftStub(ch).Speculate(metadata=token_metadata(TOKEN), timeout=60)
        await call.write(_hello(info))
        reply = await call.read()
        assert reply.hello.accepted, reply.hello.reason
        try:
            for msg in messages:
                await call.write(msg)
                if (await call.read()) is grpc.aio.EOF:
                    break
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return await call.code(), await call.details()


def test_draft_refuses_rounds_out_of_bounds_and_a_gateway_request_beside_them_keeps_its_time(secured, refs):
    draft, target, gateway = secured

    async def timed_request():
        t0 = time.monotonic()
        done = await generate(gateway.address, token_ids=PROMPTS[0], max_tokens=MAX_TOKENS[0], ignore_eos=True,
                              auth_token=TOKEN, timeout_s=120)
        assert_same_tokens(done.token_ids, refs[0])
        return time.monotonic() - t0

    async def body():
        async with channel(target.address) as ch:
            info = await target_pb2_grpc.TargetStub(ch).Info(target_pb2.InfoRequest(), timeout=5,
                                                             metadata=token_metadata(TOKEN))
        normal_s = min([await timed_request() for _ in range(2)])
        v = info.vocab_size
        hostile = {
            "round.gamma": [_round(1, 10**6, adds=[(1, [5, 6, 7])])],
            "round.adds.token_ids": [_round(1, 4, adds=[(1, [5, v + 7])])],
            "round.verdicts": [_round(1, 4, adds=[(1, [5, 6])]), _round(2, 4, verdicts=[[1, 2, -3, -1]])],
        }
        results = await asyncio.gather(timed_request(),
                                       *(_rogue(draft.address, info, msgs) for msgs in hostile.values()))
        beside_s = results[0]
        for field, (code, details) in zip(hostile, results[1:]):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)
            assert details.startswith(field), (field, details)
        # a busy stream of valid rounds at the largest gamma: the gateway's request shares the
        # drafter with it turn by turn
        seqs = range(8)   # each round rolls them back to their 30 tokens, so each drafts 64 again
        busy = [_round(1, 64, adds=[(s, list(range(10, 40))) for s in seqs])]
        busy += [_round(i, 64, verdicts=[[s, 30, 39, 0] for s in seqs]) for i in range(2, 400)]
        rogue = asyncio.ensure_future(_rogue(draft.address, info, busy))
        await asyncio.sleep(0.5)
        busy_s = await timed_request()
        rogue.cancel()
        return normal_s, beside_s, busy_s

    normal_s, beside_s, busy_s = run(body(), timeout_s=240)
    # the shared 2-core machine varies; a stalled draft took minutes (the target's round timeout)
    assert beside_s < 3 * normal_s + 2.0, (normal_s, beside_s)
    assert busy_s < 5 * normal_s + 3.0, (normal_s, busy_s)
    assert draft.alive() and target.alive()


def _cert(tmp_path, name: str):
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_mtls_on_every_hop(cluster, service_models, refs, tmp_path):
    """Each service serves TLS and requires a client certificate; the target refuses a caller
    without one; gateway -> target -> draft dial with theirs and serve == target-only greedy."""
    target_model, drafts = service_models
    (d_cert, d_key), (t_cert, t_key), (g_cert, g_key) = (_cert(tmp_path, n) for n in ("draft", "target", "gw"))
    health = {n: free_port() for n in ("draft", "target", "gateway")}

    def serving(cert, key, client_ca, name):
        return ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", client_ca, "--auth-token", TOKEN,
                "--health-port", str(health[name])]
    draft = cluster.service("draft", cluster.engine_args(drafts["copy"]) + serving(d_cert, d_key, t_cert, "draft"),
                            "draft-mtls", log_level="info")
    target = cluster.service("target", cluster.engine_args(target_model) + serving(t_cert, t_key, g_cert, "target")
                             + ["--mode", "pearl", "--gamma", str(GAMMA), "--draft", draft.address,
                                "--draft-tls-ca", d_cert, "--draft-tls-cert", t_cert, "--draft-tls-key", t_key],
                             "target-mtls")
    gateway = cluster.service("gateway", ["--model", str(target_model), "--targets", target.address,
                                          "--target-tls-ca", t_cert, "--target-tls-cert", g_cert,
                                          "--target-tls-key", g_key, "--auth-token", TOKEN,
                                          "--health-port", str(health["gateway"])], "gateway-mtls")
    services = [draft, target, gateway]
    try:
        deadline = time.time() + START_TIMEOUT_S
        for svc in services:
            svc.start()
        for svc in services:   # plaintext probes on the health ports
            svc.wait_serving(f"127.0.0.1:{health[svc.kind]}", deadline)
        draft.wait_log("target connected", timeout_s=max(1.0, deadline - time.time()))

        async def body():
            meta = token_metadata(TOKEN)
            # TLS but no client certificate: the handshake fails, no call gets through
            async with channel(target.address, tls_ca=t_cert) as ch:
                assert await _status_of(target_pb2_grpc.TargetStub(ch).Info(
                    target_pb2.InfoRequest(), timeout=5, metadata=meta)) == grpc.StatusCode.UNAVAILABLE
            async with channel(target.address) as ch:   # plaintext neither
                assert await _status_of(target_pb2_grpc.TargetStub(ch).Info(
                    target_pb2.InfoRequest(), timeout=5, metadata=meta)) == grpc.StatusCode.UNAVAILABLE
            async with channel(target.address, tls_ca=t_cert, tls_cert=g_cert, tls_key=g_key) as ch:
                info = await target_pb2_grpc.TargetStub(ch).Info(target_pb2.InfoRequest(), timeout=5, metadata=meta)
                assert info.draft_connected
            return await asyncio.gather(*(generate(gateway.address, token_ids=p, max_tokens=m, ignore_eos=True,
                                                   auth_token=TOKEN, timeout_s=120)
                                          for p, m in zip(PROMPTS, MAX_TOKENS)))
        for i, (done, ref) in enumerate(zip(run(body()), refs)):
            assert_same_tokens(done.token_ids, ref, label=f"request {i}: ")
            assert done.stats.mode == "pearl"
    finally:
        stop_all(services)


def test_a_target_holding_the_wrong_draft_token_says_why(cluster, service_models):
    """A target whose --draft-auth-token is not the draft's: its dials are refused, it warns with
    the draft's status (not a transport error) and reports no draft connected."""
    target_model, drafts = service_models
    draft = cluster.service("draft", cluster.engine_args(drafts["copy"]) + ["--auth-token", TOKEN],
                            "draft-token", log_level="info")
    target = cluster.service("target", cluster.engine_args(target_model) + [
        "--mode", "pearl", "--gamma", str(GAMMA), "--draft", draft.address, "--draft-auth-token", "wrong"],
        "target-wrong-token")
    services = [draft, target]
    try:
        cluster.launch(services)
        target.wait_log("draft unreachable; serving ar until it answers", timeout_s=30)
        warning = next(line for line in target.log().splitlines() if "draft unreachable" in line)
        assert "UNAUTHENTICATED" in warning and "bearer token" in warning, warning

        async def body():
            async with channel(target.address) as ch:
                info = await target_pb2_grpc.TargetStub(ch).Info(target_pb2.InfoRequest(), timeout=5)
            assert not info.draft_connected
        run(body())
    finally:
        stop_all(services)
