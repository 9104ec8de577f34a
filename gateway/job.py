"""The gateway's domain objects: what a client asked for, what was validated, what a target said."""
from dataclasses import dataclass, field

from pearl_runtime.sampling import SamplingParams

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
class Job:
    """A validated request: everything a target needs, plus the stop strings the gateway applies."""
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams          # carries stop_token_ids; max_tokens counts from the prompt's end
    stop: tuple[str, ...] = ()


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
