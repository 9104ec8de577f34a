"""The target's messages <-> its domain: Submission -> Request, requests -> Round,
DraftBatch -> DraftTokens, committed tokens -> TokenBatch, RoundStats -> TargetMetrics."""
import grpc

from pearl_runtime import validation
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.errors import InvalidRequest
from pearl_runtime.pb import common_pb2, draft_pb2, target_pb2
from pearl_runtime.rpc import params as wire_params
from pearl_runtime.rpc import tensors
from pearl_runtime.rpc.identity import PROTOCOL_VERSION
from target_service.verifier import DraftTokens, Request

FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


def request_from(item: target_pb2.Submission, sink) -> Request:
    """A Submission as a Request, its fields checked by the gateway's rules (a caller may
    reach Serve without the gateway); the rules that need the model are the verifier's."""
    validation.check_request_id(item.request_id)
    try:
        params = wire_params.from_proto(item.params, item.stop_token_ids)
    except InvalidRequest as e:   # SamplingParams names its own field; the caller knows it as params.*
        raise validation.nested("params.", e) from None
    return Request(item.request_id, Sequence(list(item.prompt_ids), params), sink=sink,
                   traceparent=item.traceparent)


def error_seq(request_id: str, message: str, code: grpc.StatusCode) -> target_pb2.SeqUpdate:
    # a refused id may be the unbounded input itself: echoed no longer than a valid one can be
    request_id = request_id[:validation.MAX_REQUEST_ID_BYTES]
    return target_pb2.SeqUpdate(request_id=request_id, error=message, error_code=code.value[0])


def error_update(request_id: str, message: str, code: grpc.StatusCode) -> target_pb2.TargetOut:
    return token_batch([error_seq(request_id, message, code)])


def token_update(req: Request, path: str) -> target_pb2.SeqUpdate:
    """The request's tokens committed since its last update (and its end, once finished, or its error)."""
    if req.error is not None:   # it failed alone in its round
        return error_seq(req.request_id, f"the target failed on this request: {req.error}", grpc.StatusCode.INTERNAL)
    upd = target_pb2.SeqUpdate(request_id=req.request_id, token_ids=req.new_tokens, target_forwards=req.forwards,
                               path=path)
    if req.finished:
        upd.finish_reason = FINISH[req.seq.finish_reason]
    return upd


def token_batch(updates: list[target_pb2.SeqUpdate]) -> target_pb2.TargetOut:
    return target_pb2.TargetOut(tokens=target_pb2.TokenBatch(updates=updates))


def hello(target_id: str, tok_hash: str, vocab_size: int, device, device_tokens: bool,
          round_datagrams: bool) -> draft_pb2.Hello:
    """The Speculate handshake's first message: who the target is and what it asks of the draft."""
    return draft_pb2.Hello(target_id=target_id, tokenizer_hash=tok_hash, vocab_size=vocab_size,
                           device=device.index if device.type == "cuda" else -1, device_tokens=device_tokens,
                           round_datagrams=round_datagrams, protocol_version=PROTOCOL_VERSION)


def seq_add(req: Request) -> draft_pb2.SeqAdd:
    """The request as the draft mirrors it: its committed tokens (pending ones are the draft's own)."""
    committed = req.seq.token_ids[:len(req.seq) - len(req.pending)]
    return draft_pb2.SeqAdd(seq_id=req.seq.seq_id, token_ids=committed, params=wire_params.to_proto(req.seq.params),
                            request_id=req.request_id, traceparent=req.traceparent)


def round_message(round_id: int, gamma: int, removes: list[int], verdicts: list[tuple], adds: list[Request],
                  device_tokens: bool) -> draft_pb2.Round:
    rnd = draft_pb2.Round(round_id=round_id, gamma=gamma, removes=removes, device_tokens=device_tokens)
    if verdicts:
        rnd.verdicts.CopyFrom(tensors.encode_ints(verdicts, "int64"))
    rnd.adds.extend(seq_add(r) for r in adds)
    return rnd


def draft_tokens(batch: draft_pb2.DraftBatch | None, skip: dict[int, int] | None = None) -> dict[int, DraftTokens]:
    """A DraftBatch by seq id; `skip` drops each sequence's first tokens (already pending)."""
    if batch is None:
        return {}
    toks = tensors.decode_ints(batch.tokens)
    probs = None if tensors.is_empty(batch.probs) else tensors.decode(batch.probs)
    out = {}
    for i, sid in enumerate(batch.seq_ids):
        k = skip.get(sid, 0) if skip else 0
        out[sid] = DraftTokens(toks[i][k:], None if probs is None else probs[i][k:])
    return out
