"""Protobuf <-> gateway domain objects; the only module below the servicers that sees messages."""
import dataclasses
from dataclasses import dataclass

from pearl_runtime.pb import common_pb2, gateway_pb2, target_pb2
from pearl_runtime.rpc import params as wire_params
from pearl_runtime.rpc.status import Relayed, code_from_int

from gateway.job import (CANCELLED, LENGTH, STOP, STOP_STRING, ChatMessage, Job, Request, Stats,
                         TargetInfo)

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


def request_from_proto(msg: gateway_pb2.GenerateRequest) -> Request:
    p = msg.params
    kind = msg.WhichOneof("prompt")

    def opt(name):
        return getattr(p, name) if p.HasField(name) else None

    return Request(
        request_id=msg.request_id, model=msg.model,
        text=msg.text if kind == "text" else None,
        chat=tuple(ChatMessage(m.role, m.content) for m in msg.chat.messages) if kind == "chat" else None,
        token_ids=tuple(msg.tokens.ids) if kind == "tokens" else None,
        temperature=opt("temperature"), top_p=opt("top_p"), top_k=opt("top_k"),
        max_tokens=opt("max_tokens"), seed=opt("seed"), ignore_eos=p.ignore_eos,
        stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids))


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


def submission(job: Job, prompt_ids: list[int], max_tokens: int) -> target_pb2.Submission:
    """A job as a target sees it; a resubmission passes prompt + tokens already streamed."""
    params = wire_params.to_proto(job.params)
    params.max_tokens = max_tokens
    return target_pb2.Submission(request_id=job.request_id, prompt_ids=prompt_ids, params=params,
                                 stop_token_ids=job.params.stop_token_ids)


def info_from_proto(msg: target_pb2.ModelInfo) -> TargetInfo:
    return TargetInfo(model=msg.model, vocab_size=msg.vocab_size, max_model_len=msg.max_model_len,
                      eos_token_ids=tuple(msg.eos_token_ids), tokenizer_hash=msg.tokenizer_hash,
                      mode=msg.mode)


@dataclass
class Update:
    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    target_forwards: int
    error: Relayed | None
    path: str = ""          # pearl | sd | ar: the round's real path (ar while a draft is down)


def update_from_proto(msg: target_pb2.SeqUpdate) -> Update:
    error = Relayed(code_from_int(msg.error_code), msg.error) if msg.error else None
    return Update(msg.request_id, list(msg.token_ids), finish_from_proto(msg.finish_reason),
                  msg.target_forwards, error, msg.path)


def delta(request_id: str, text: str, token_ids: list[int]) -> gateway_pb2.GenerateResponse:
    return gateway_pb2.GenerateResponse(
        request_id=request_id, delta=gateway_pb2.Delta(text=text, token_ids=token_ids))


def final(request_id: str, text: str, reason: str | None, stats: Stats) -> gateway_pb2.GenerateResponse:
    return gateway_pb2.GenerateResponse(
        request_id=request_id, final=gateway_pb2.Final(
            text=text, finish_reason=finish_to_proto(reason),
            stats=gateway_pb2.Stats(**dataclasses.asdict(stats))))


def stats_from_proto(msg: gateway_pb2.Stats) -> Stats:
    return Stats(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(Stats)})
