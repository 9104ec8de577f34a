from pearl_runtime.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("target_id", "tokenizer_hash", "vocab_size", "host_id", "device", "device_tokens", "round_datagrams", "protocol_version")
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUND_DATAGRAMS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    target_id: str
    tokenizer_hash: str
    vocab_size: int
    host_id: str
    device: int
    device_tokens: bool
    round_datagrams: bool
    protocol_version: int
    def __init__(self, target_id: _Optional[str] = ..., tokenizer_hash: _Optional[str] = ..., vocab_size: _Optional[int] = ..., host_id: _Optional[str] = ..., device: _Optional[int] = ..., device_tokens: _Optional[bool] = ..., round_datagrams: _Optional[bool] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("accepted", "reason", "draft_model", "tokenizer_hash", "vocab_size", "step_batch_sizes", "step_ms", "ipc_buffers", "round_port", "round_key", "protocol_version")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    IPC_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_PORT_FIELD_NUMBER: _ClassVar[int]
    ROUND_KEY_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    draft_model: str
    tokenizer_hash: str
    vocab_size: int
    step_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    step_ms: _containers.RepeatedScalarFieldContainer[float]
    ipc_buffers: _containers.RepeatedCompositeFieldContainer[_common_pb2.IpcBuffer]
    round_port: int
    round_key: bytes
    protocol_version: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., draft_model: _Optional[str] = ..., tokenizer_hash: _Optional[str] = ..., vocab_size: _Optional[int] = ..., step_batch_sizes: _Optional[_Iterable[int]] = ..., step_ms: _Optional[_Iterable[float]] = ..., ipc_buffers: _Optional[_Iterable[_Union[_common_pb2.IpcBuffer, _Mapping]]] = ..., round_port: _Optional[int] = ..., round_key: _Optional[bytes] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class SeqAdd(_message.Message):
    __slots__ = ("seq_id", "token_ids", "params", "request_id", "traceparent")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    request_id: str
    traceparent: str
    def __init__(self, seq_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("round_id", "gamma", "adds", "removes", "verdicts", "early", "device_tokens")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ADDS_FIELD_NUMBER: _ClassVar[int]
    REMOVES_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    gamma: int
    adds: _containers.RepeatedCompositeFieldContainer[SeqAdd]
    removes: _containers.RepeatedScalarFieldContainer[int]
    verdicts: _common_pb2.Tensor
    early: int
    device_tokens: bool
    def __init__(self, round_id: _Optional[int] = ..., gamma: _Optional[int] = ..., adds: _Optional[_Iterable[_Union[SeqAdd, _Mapping]]] = ..., removes: _Optional[_Iterable[int]] = ..., verdicts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., early: _Optional[int] = ..., device_tokens: _Optional[bool] = ...) -> None: ...

class ToDraft(_message.Message):
    __slots__ = ("hello", "round")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    round: Round
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., round: _Optional[_Union[Round, _Mapping]] = ...) -> None: ...

class DraftBatch(_message.Message):
    __slots__ = ("round_id", "seq_ids", "tokens", "probs", "draft_ms", "early", "received_at", "sent_at")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _common_pb2.Tensor
    probs: _common_pb2.Tensor
    draft_ms: float
    early: bool
    received_at: float
    sent_at: float
    def __init__(self, round_id: _Optional[int] = ..., seq_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., probs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., draft_ms: _Optional[float] = ..., early: _Optional[bool] = ..., received_at: _Optional[float] = ..., sent_at: _Optional[float] = ...) -> None: ...

class FromDraft(_message.Message):
    __slots__ = ("hello", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: HelloReply
    batch: DraftBatch
    def __init__(self, hello: _Optional[_Union[HelloReply, _Mapping]] = ..., batch: _Optional[_Union[DraftBatch, _Mapping]] = ...) -> None: ...
