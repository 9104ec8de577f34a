"""Protobuf <-> gateway domain objects; the only module below the servicers that sees messages."""
import dataclasses
from dataclasses import dataclass

from pearl_runtime.client import (  # noqa: F401  (re-exported: the client's half of the wire)
    finish_from_proto, finish_to_proto, request_to_proto, stats_from_proto)
from pearl_runtime.rpc import params as wire_params
from pearl_runtime.pb import gateway_pb2, target_pb2
from pearl_runtime.rpc.status import Relayed, code_from_int

from gateway.job import ChatMessage, Job, Request, Stats, TargetInfo


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


def submission(job: Job, prompt_ids: list[int], max_tokens: int) -> target_pb2.Submission:
    """A job as a target sees it; a resubmission passes prompt + tokens already streamed."""
    params = wire_params.to_proto(job.params)
    params.max_tokens = max_tokens
    return target_pb2.Submission(request_id=job.request_id, prompt_ids=prompt_ids, params=params,
                                 stop_token_ids=job.params.stop_token_ids, traceparent=job.traceparent)


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
