"""The target's handshake with a real gRPC server: the Hello goes out once the draft's headers
came (a refusing draft's status is read, not lost to a failed write), or after HEADERS_WAIT_S
from a draft that sends none before its reply."""
import asyncio
import time

import grpc
import pytest

from pearl_runtime.pb import draft_pb2, draft_pb2_grpc
from pearl_runtime.rpc.identity import PROTOCOL_VERSION
from target_service import draft_link
from target_service.draft_link import DraftLink


class HelloDraft(draft_pb2_grpc.DraftServicer):
    """Answers the Hello; its headers go first (as draft_service's do) or with that answer."""

    def __init__(self, early_headers: bool):
        self.early_headers = early_headers

    async def Speculate(self, request_iterator, context):
        if self.early_headers:
            await context.send_initial_metadata(())
        first = await anext(aiter(request_iterator))
        assert first.WhichOneof("kind") == "hello"
        yield draft_pb2.FromDraft(hello=draft_pb2.HelloReply(accepted=True, draft_model="hello",
                                                             protocol_version=PROTOCOL_VERSION))
        async for _ in request_iterator:
            pass


async def _handshake(early_headers: bool) -> tuple[DraftLink, float]:
    server = grpc.aio.server()
    draft_pb2_grpc.add_DraftServicer_to_server(HelloDraft(early_headers), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = DraftLink(f"127.0.0.1:{port}", draft_pb2.Hello(protocol_version=PROTOCOL_VERSION))
    try:
        t0 = time.monotonic()
        await link._connect()
        return link, time.monotonic() - t0
    finally:
        await link.mark_down()
        await server.stop(None)


@pytest.mark.parametrize("early_headers", [True, False], ids=["headers-first", "no-early-headers"])
def test_the_handshake_completes_with_either_draft(early_headers):
    link, took = asyncio.run(_handshake(early_headers))
    assert link.generation == 1 and link.info.draft_model == "hello"
    if early_headers:
        assert took < draft_link.HEADERS_WAIT_S   # no wait for a draft that sends its headers
    else:
        assert took >= draft_link.HEADERS_WAIT_S   # the Hello went after the wait, and was answered
