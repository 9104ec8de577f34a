"""The public Gateway API client: `generate` / `list_models` (async) and `Client` (sync).

Also the client-side domain objects (Request, ChatMessage, Stats) and their protobuf
conversions, which the gateway imports from here. Imports neither the gateway nor torch.
"""
import asyncio
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from pearl_runtime.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from pearl_runtime.rpc.security import channel as secure_or_plain
from pearl_runtime.rpc.security import token_metadata

# finish reasons as the runtime spells them, plus the gateway's own
STOP, LENGTH, STOP_STRING, CANCELLED = "stop", "length", "stop_string", "cancelled"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Request:
    """A Generate call before validation; sampling fields are None when the client left them unset."""
    request_id: str = ""
    model: str = ""
    text: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    new_tokens: int
    target_forwards: int
    mean_accepted_tokens: float
    time_to_first_token_ms: float
    total_ms: float
    tokens_per_s: float     # new tokens over the request's whole wall time (prefill included)
    mode: str

    @classmethod
    def measure(cls, prompt_tokens: int, new_tokens: int, target_forwards: int, ttft_ms: float,
                total_ms: float, mode: str) -> "Stats":
        return cls(prompt_tokens, new_tokens, target_forwards,
                   new_tokens / target_forwards if target_forwards else 0.0, ttft_ms, total_ms,
                   new_tokens / (total_ms / 1e3) if total_ms > 0 else 0.0, mode)


@dataclass
class Completion:
    request_id: str
    text: str
    finish_reason: str | None             # stop | length | stop_string | cancelled
    stats: Stats
    token_ids: list[int] = field(default_factory=list)


# ---- protobuf <-> domain (the client's half; gateway/wire.py has the server's) ----

_FINISH = {
    STOP: common_pb2.FINISH_REASON_STOP,
    LENGTH: common_pb2.FINISH_REASON_LENGTH,
    STOP_STRING: common_pb2.FINISH_REASON_STOP_STRING,
    CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}
_FINISH_BACK = {v: k for k, v in _FINISH.items()}


def finish_to_proto(reason: str | None) -> int:
    return _FINISH.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED)


def finish_from_proto(value: int) -> str | None:
    return _FINISH_BACK.get(value)


def request_to_proto(req: Request) -> gateway_pb2.GenerateRequest:
    """The client side of request_from_proto; None sampling fields stay unset on the wire."""
    params = common_pb2.SamplingParams(ignore_eos=req.ignore_eos)
    for name in ("temperature", "top_p", "top_k", "max_tokens", "seed"):
        if (value := getattr(req, name)) is not None:
            setattr(params, name, value)
    msg = gateway_pb2.GenerateRequest(request_id=req.request_id, model=req.model, params=params,
                                      stop=req.stop, stop_token_ids=req.stop_token_ids)
    if req.text is not None:
        msg.text = req.text
    elif req.chat is not None:
        msg.chat.messages.extend(gateway_pb2.ChatMessage(role=m.role, content=m.content) for m in req.chat)
        msg.chat.SetInParent()      # an empty chat is still a chat prompt (and is rejected as such)
    elif req.token_ids is not None:
        msg.tokens.ids.extend(req.token_ids)
        msg.tokens.SetInParent()
    return msg


def stats_from_proto(msg: gateway_pb2.Stats) -> Stats:
    return Stats(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(Stats)})


# ---- the async API ----

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
    call = gateway_pb2_grpc.GatewayStub(channel).Generate(request_to_proto(req), timeout=timeout_s,
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
            return Completion(msg.request_id, f.text, finish_from_proto(f.finish_reason),
                              stats_from_proto(f.stats), ids)
    raise RuntimeError("the gateway closed the stream without a final message")


# ---- the sync API ----

class Client:
    """A blocking client for one gateway address; runs the async API on its own event loop.

    Use it from code without a running loop (scripts, notebooks without await):
    `with Client("localhost:50051") as c: print(c.generate("Hello", max_tokens=16).text)`.
    """

    def __init__(self, address: str, *, auth_token: str | None = None, tls_ca: str | None = None,
                 tls_server_name: str | None = None):
        self.address = address
        self._auth = dict(auth_token=auth_token, tls_ca=tls_ca, tls_server_name=tls_server_name)
        self._loop = asyncio.new_event_loop()

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        """As the async `generate`, blocking; `on_delta` may be a plain function."""
        return self._loop.run_until_complete(generate(self.address, prompt, **{**self._auth, **kwargs}))

    def list_models(self, timeout_s: float = 10.0) -> list[str]:
        return self._loop.run_until_complete(list_models(self.address, timeout_s, **self._auth))

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
