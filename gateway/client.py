"""A small async streaming client for the Gateway (used by `pearl generate`, benchmarks and tests)."""
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from pearl_runtime.pb import gateway_pb2, gateway_pb2_grpc
from pearl_runtime.rpc.security import channel as secure_or_plain
from pearl_runtime.rpc.security import token_metadata

from gateway import wire
from gateway.job import ChatMessage, Request, Stats


@dataclass
class Completion:
    request_id: str
    text: str
    finish_reason: str | None             # stop | length | stop_string | cancelled
    stats: Stats
    token_ids: list[int] = field(default_factory=list)


async def generate(address: str, prompt: str | None = None, *,
                   chat: Sequence[tuple[str, str] | ChatMessage] | None = None,
                   token_ids: Sequence[int] | None = None,
                   temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, max_tokens: int | None = None, seed: int | None = None,
                   ignore_eos: bool = False, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                   model: str = "", request_id: str = "",
                   on_delta: Callable[[str, list[int]], object] | None = None,
                   timeout_s: float = 300.0, channel: grpc.aio.Channel | None = None,
                   auth_token: str | None = None, tls_ca: str | None = None,
                   tls_server_name: str | None = None) -> Completion:
    """Stream one completion. Give exactly one of `prompt` (text), `chat` ((role, content) pairs)
    or `token_ids`. `on_delta(text, token_ids)` is called per delta (awaited if it returns an
    awaitable). Unset sampling fields take the gateway's defaults. Errors raise
    grpc.aio.AioRpcError (INVALID_ARGUMENT names the field; DEADLINE_EXCEEDED after timeout_s).
    Pass `channel` to reuse one connection across many calls. `auth_token` is sent as a bearer
    token; `tls_ca` (the CA or self-signed certificate to trust) turns on TLS."""
    if sum(x is not None for x in (prompt, chat, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, chat or token_ids")
    req = Request(
        request_id=request_id, model=model, text=prompt,
        chat=None if chat is None else tuple(m if isinstance(m, ChatMessage) else ChatMessage(*m) for m in chat),
        token_ids=None if token_ids is None else tuple(token_ids),
        temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
        ignore_eos=ignore_eos, stop=tuple(stop), stop_token_ids=tuple(stop_token_ids))
    metadata = token_metadata(auth_token)
    if channel is not None:
        return await _stream(channel, req, on_delta, timeout_s, metadata)
    async with secure_or_plain(address, tls_ca, tls_server_name) as ch:
        return await _stream(ch, req, on_delta, timeout_s, metadata)


async def list_models(address: str, timeout_s: float = 10.0, auth_token: str | None = None,
                      tls_ca: str | None = None, tls_server_name: str | None = None) -> list[str]:
    async with secure_or_plain(address, tls_ca, tls_server_name) as ch:
        resp = await gateway_pb2_grpc.GatewayStub(ch).ListModels(
            gateway_pb2.ListModelsRequest(), timeout=timeout_s, metadata=token_metadata(auth_token))
        return list(resp.models)


async def _stream(channel, req: Request, on_delta, timeout_s: float, metadata=()) -> Completion:
    ids: list[int] = []
    call = gateway_pb2_grpc.GatewayStub(channel).Generate(wire.request_to_proto(req), timeout=timeout_s,
                                                          metadata=metadata)
    async for msg in call:
        if msg.HasField("delta"):
            ids.extend(msg.delta.token_ids)
            if on_delta is not None:
                result = on_delta(msg.delta.text, list(msg.delta.token_ids))
                if inspect.isawaitable(result):
                    await result
        else:
            f = msg.final
            return Completion(msg.request_id, f.text, wire.finish_from_proto(f.finish_reason),
                              wire.stats_from_proto(f.stats), ids)
    raise RuntimeError("the gateway closed the stream without a final message")
