"""The OpenAI-compatible HTTP front (`--http-port`): /v1/models, /v1/completions and
/v1/chat/completions (JSON or server-sent events) over gateway/generation.py, plus /health and
/metrics; aiohttp on the gateway's own event loop."""
import contextlib
import hmac
import json
import time
from dataclasses import dataclass

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pearl_runtime.errors import InvalidRequest, PearlError
from pearl_runtime.log import get_logger
from pearl_runtime.rpc.health import Health
from pearl_runtime.rpc.status import status_of
from pearl_runtime.validation import check_request_id

from gateway.generation import Delta, Final, Generation, new_request_id, renamed, sampling_from_json
from gateway.job import STOP_STRING, ChatMessage, Request
from gateway.public_port import MAX_REQUEST_BYTES

log = get_logger(__name__)

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              429: "rate_limit_error", 503: "service_unavailable"}
# what OpenAI's finish_reason says for ours (a stop string is a stop to an OpenAI client)
FINISH = {"stop": "stop", STOP_STRING: "stop", "length": "length"}
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
OPEN_PATHS = ("/health", "/metrics")
# our field names as an OpenAI client knows them
CLIENT_NAMES = {"params.max_tokens": "max_tokens", **{f"params.{k}": k for k in SAMPLING},
                "prompt.chat.messages": "messages", "prompt.chat": "messages", "prompt.text": "prompt",
                "prompt.tokens.ids": "prompt", "request_id": "x-request-id"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass(frozen=True)
class Asked:
    """One completions call read from its body."""
    request: Request
    chat: bool
    stream: bool
    include_usage: bool


def error_response(e: ApiError) -> web.Response:
    body = {"error": {"message": str(e), "type": ERROR_TYPE.get(e.status, "server_error"),
                      "param": e.param, "code": e.code}}
    return web.json_response(body, status=e.status)


def api_error(e: PearlError) -> ApiError:
    if isinstance(e, InvalidRequest):
        e = renamed(e, CLIENT_NAMES)
    code, message = status_of(e)
    field = e.field if isinstance(e, InvalidRequest) else None
    if field == "model":     # an unknown model is OpenAI's 404
        return ApiError(404, message, "model", "model_not_found")
    return ApiError(HTTP_STATUS.get(code, 500), message, field)


class OpenAIFront:
    def __init__(self, generation: Generation, health: Health, registry: CollectorRegistry,
                 auth_token: str | None):
        self._generation = generation
        self._health = health
        self._registry = registry
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[self._errors])
        app.add_routes([web.get("/v1/models", self.models),
                        web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.get("/health", self.health), web.get("/metrics", self.metrics)])
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """The bearer token, then the one place errors become OpenAI's error JSON."""
        try:
            if self._expected and request.path not in OPEN_PATHS:
                sent = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(sent, self._expected):   # constant time
                    raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                   code="invalid_api_key")
            return await handler(request)
        except ApiError as e:
            return error_response(e)
        except PearlError as e:
            return error_response(api_error(e))
        except web.HTTPException as e:     # aiohttp's own: unknown path, wrong method, body too large
            return error_response(ApiError(e.status, e.reason))

    async def health(self, request: web.Request) -> web.Response:
        if self._health.serving:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "not ready", "reason": self._health.reason}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        info = self._generation.router.ready_info()
        return web.json_response({"object": "list", "data": [
            {"id": info.model, "object": "model", "created": 0, "owned_by": "pearl-serve"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        request_id = check_request_id(request.headers.get("x-request-id", ""), "x-request-id") or new_request_id()
        asked = read_body(await _json(request), chat, request_id)
        outs = self._generation.stream(asked.request, request.headers.get("traceparent", ""))
        async with contextlib.aclosing(outs):
            # the first event before any header: a refused request is a plain HTTP error
            first = await anext(outs)
            shape = Shape(asked, self._generation.router.model, request_id)
            headers = {"x-request-id": request_id}
            if not asked.stream:
                final = first if isinstance(first, Final) else await _last(outs)
                return web.json_response(shape.whole(final), headers=headers)
            events = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                                 "Cache-Control": "no-cache"})
            await events.prepare(request)
            try:
                await _send(events, shape.opening())
                out = first
                while True:
                    for chunk in shape.chunks(out):
                        await _send(events, chunk)
                    if isinstance(out, Final):
                        break
                    out = await anext(outs)
            except PearlError as e:     # after the headers: the error is the stream's last event
                err = api_error(e)
                await _send(events, {"error": {"message": str(err), "type": ERROR_TYPE.get(err.status, "server_error"),
                                               "param": err.param, "code": err.code}})
            await events.write(b"data: [DONE]\n\n")
            await events.write_eof()
            return events


class Shape:
    """OpenAI's response bodies and stream chunks for one call."""

    def __init__(self, asked: Asked, model: str, request_id: str):
        self.asked = asked
        self.model = model
        self.id = ("chatcmpl-" if asked.chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.object = "chat.completion" if asked.chat else "text_completion"

    def whole(self, final: Final) -> dict:
        choice = {"index": 0, "finish_reason": FINISH.get(final.finish_reason, "stop"), "logprobs": None}
        choice |= ({"message": {"role": "assistant", "content": final.text}} if self.asked.chat
                   else {"text": final.text})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(final)}

    def opening(self) -> dict | None:
        return self._chunk({"role": "assistant", "content": ""}, None) if self.asked.chat else None

    def chunks(self, out: Delta | Final) -> list[dict]:
        if isinstance(out, Delta):
            return [self._chunk({"content": out.text} if self.asked.chat else out.text, None)] if out.text else []
        done = [self._chunk({} if self.asked.chat else "", FINISH.get(out.finish_reason, "stop"))]
        if self.asked.include_usage:
            done.append({"id": self.id, "object": self._chunk_object, "created": self.created,
                         "model": self.model, "choices": [], "usage": usage(out)})
        return done

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.asked.chat else "text_completion"

    def _chunk(self, delta, finish_reason: str | None) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        choice |= {"delta": delta} if self.asked.chat else {"text": delta}
        return {"id": self.id, "object": self._chunk_object, "created": self.created, "model": self.model,
                "choices": [choice]}


def usage(final: Final) -> dict:
    s = final.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
            "total_tokens": s.prompt_tokens + s.new_tokens}


def read_body(body: dict, chat: bool, request_id: str) -> Asked:
    """A completions body as a Request; what this server cannot honour is a 400 naming it."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only n = 1 is supported (one completion per request)", "n")
    for unsupported in ("logprobs", "echo", "tools", "functions"):
        if body.get(unsupported) not in (None, False):
            raise ApiError(400, f"{unsupported}: not supported by this server", unsupported)
    if body.get("best_of", 1) != 1:
        raise ApiError(400, "best_of: only 1 is supported", "best_of")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = sampling_from_json({k: body.get(k) for k in SAMPLING} | {"max_tokens": max_tokens}, "")
    prompt = _chat(body.get("messages")) if chat else _prompt(body.get("prompt"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options", "must be an object")
    return Asked(Request(request_id=request_id, model=model, **prompt, **sampling), chat,
                 stream=bool(body.get("stream", False)), include_usage=bool(options.get("include_usage")))


def _prompt(prompt) -> dict:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]      # one prompt in a batch of one
    if isinstance(prompt, str):
        return {"text": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"token_ids": tuple(prompt)}
    raise InvalidRequest("prompt", "must be a string, a list of one string, or a list of token ids")


def _chat(messages) -> dict:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}]", "must be an object with a role and a content")
        content = m.get("content")
        if isinstance(content, list):   # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidRequest(f"messages[{i}].content", "only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append(ChatMessage(m["role"], content))
    return {"chat": tuple(out)}


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


async def _last(outs) -> Final:
    async for out in outs:
        if isinstance(out, Final):
            return out
    raise RuntimeError("the generation ended without a final")


async def _send(events: web.StreamResponse, chunk: dict | None) -> None:
    if chunk is not None:
        await events.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")


@dataclass
class HttpFront:
    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve_http(front: OpenAIFront, host: str, port: int) -> HttpFront:
    """Serve `front` on host:port (0: a free port) on the running event loop."""
    # a client that disconnects cancels its handler, and so its request on the target
    runner = web.AppRunner(front.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    log.info("openai http front listening", address=f"{host}:{bound}")
    return HttpFront(runner, bound)
