from pearl_runtime.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TargetMetrics(_message.Message):
    __slots__ = ("rounds", "speculative_rounds", "draft_ms", "target_ms", "wait_ms", "round_ms", "committed_tokens", "drafted_tokens", "accepted_tokens", "path", "gamma", "head_start_rounds", "draft_connected", "exchange_ms", "gamma_sum", "gamma_by_batch", "verify_times", "judged_runs", "xfer_out_ms", "xfer_back_ms", "xfer_rounds", "device_token_rounds", "head_start", "head_start_quorum", "auto_gamma")
    class GammaByBatchEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MS_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    ROUND_MS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_MS_FIELD_NUMBER: _ClassVar[int]
    GAMMA_SUM_FIELD_NUMBER: _ClassVar[int]
    GAMMA_BY_BATCH_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TIMES_FIELD_NUMBER: _ClassVar[int]
    JUDGED_RUNS_FIELD_NUMBER: _ClassVar[int]
    XFER_OUT_MS_FIELD_NUMBER: _ClassVar[int]
    XFER_BACK_MS_FIELD_NUMBER: _ClassVar[int]
    XFER_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOKEN_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_QUORUM_FIELD_NUMBER: _ClassVar[int]
    AUTO_GAMMA_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    speculative_rounds: int
    draft_ms: float
    target_ms: float
    wait_ms: float
    round_ms: float
    committed_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    path: str
    gamma: int
    head_start_rounds: int
    draft_connected: bool
    exchange_ms: float
    gamma_sum: int
    gamma_by_batch: _containers.ScalarMap[int, int]
    verify_times: _containers.RepeatedCompositeFieldContainer[VerifyTime]
    judged_runs: _containers.RepeatedCompositeFieldContainer[JudgedRun]
    xfer_out_ms: float
    xfer_back_ms: float
    xfer_rounds: int
    device_token_rounds: int
    head_start: int
    head_start_quorum: float
    auto_gamma: bool
    def __init__(self, rounds: _Optional[int] = ..., speculative_rounds: _Optional[int] = ..., draft_ms: _Optional[float] = ..., target_ms: _Optional[float] = ..., wait_ms: _Optional[float] = ..., round_ms: _Optional[float] = ..., committed_tokens: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., path: _Optional[str] = ..., gamma: _Optional[int] = ..., head_start_rounds: _Optional[int] = ..., draft_connected: _Optional[bool] = ..., exchange_ms: _Optional[float] = ..., gamma_sum: _Optional[int] = ..., gamma_by_batch: _Optional[_Mapping[int, int]] = ..., verify_times: _Optional[_Iterable[_Union[VerifyTime, _Mapping]]] = ..., judged_runs: _Optional[_Iterable[_Union[JudgedRun, _Mapping]]] = ..., xfer_out_ms: _Optional[float] = ..., xfer_back_ms: _Optional[float] = ..., xfer_rounds: _Optional[int] = ..., device_token_rounds: _Optional[int] = ..., head_start: _Optional[int] = ..., head_start_quorum: _Optional[float] = ..., auto_gamma: _Optional[bool] = ...) -> None: ...

class JudgedRun(_message.Message):
    __slots__ = ("judged", "accepted", "count")
    JUDGED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    judged: int
    accepted: int
    count: int
    def __init__(self, judged: _Optional[int] = ..., accepted: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class VerifyTime(_message.Message):
    __slots__ = ("batch", "query", "ms")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    query: int
    ms: float
    def __init__(self, batch: _Optional[int] = ..., query: _Optional[int] = ..., ms: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "vocab_size", "max_model_len", "eos_token_ids", "tokenizer_hash", "mode", "draft_connected", "draft_address")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    model: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokenizer_hash: str
    mode: str
    draft_connected: bool
    draft_address: str
    def __init__(self, model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., tokenizer_hash: _Optional[str] = ..., mode: _Optional[str] = ..., draft_connected: _Optional[bool] = ..., draft_address: _Optional[str] = ...) -> None: ...

class Submission(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "params", "stop_token_ids", "traceparent")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    traceparent: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class SubmitBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Submission]
    def __init__(self, items: _Optional[_Iterable[_Union[Submission, _Mapping]]] = ...) -> None: ...

class CancelBatch(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TargetIn(_message.Message):
    __slots__ = ("submit", "cancel")
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    submit: SubmitBatch
    cancel: CancelBatch
    def __init__(self, submit: _Optional[_Union[SubmitBatch, _Mapping]] = ..., cancel: _Optional[_Union[CancelBatch, _Mapping]] = ...) -> None: ...

class SeqUpdate(_message.Message):
    __slots__ = ("request_id", "token_ids", "finish_reason", "target_forwards", "error", "error_code", "path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    target_forwards: int
    error: str
    error_code: int
    path: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., target_forwards: _Optional[int] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[SeqUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[SeqUpdate, _Mapping]]] = ...) -> None: ...

class TargetOut(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenBatch
    def __init__(self, tokens: _Optional[_Union[TokenBatch, _Mapping]] = ...) -> None: ...
