"""The gateway's domain objects: what a client asked for, what was validated, what a target said."""
from dataclasses import dataclass, field

from pearl_runtime.client import (CANCELLED, LENGTH, STOP, STOP_STRING,  # noqa: F401  (re-exported)
                                   ChatMessage, Request, Stats)
from pearl_runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Job:
    """A validated request: everything a target needs, plus the stop strings the gateway applies."""
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams          # carries stop_token_ids; max_tokens counts from the prompt's end
    stop: tuple[str, ...] = ()
    traceparent: str = ""           # W3C trace context from the client, passed on to the target


@dataclass(frozen=True)
class TargetInfo:
    model: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    tokenizer_hash: str = ""
    mode: str = ""


@dataclass
class Progress:
    """Newly committed tokens of one request (possibly several target updates merged)."""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    target_forwards: int = 0        # over all targets that served the request
    mode: str = ""
