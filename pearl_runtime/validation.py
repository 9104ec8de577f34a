"""The field rules of a generation request, one set for the gateway and the target.

The gateway applies them to a client's request; the target applies them again to each
Submission (a caller may reach Target.Serve without the gateway). A broken rule is an
InvalidRequest naming its field. Messages quote input only cut short (QUOTE_CHARS). The
bounds are documented in docs/gateway.md.
"""
import math

from pearl_runtime.errors import InvalidRequest

# temperature is 0 (greedy) or in [MIN, MAX]: far below MIN, logits / t overflows float32 (a
# denormal such as 1e-45 makes every probability NaN) and sampling is greedy in all but name;
# above MAX every distribution is uniform to float precision
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
INT32_MAX = 2**31 - 1

# sizes, in UTF-8 bytes or items, checked before anything tokenizes or scans the request
MAX_TEXT_BYTES = 2 * 2**20          # a text prompt, and each chat message's content
MAX_CHAT_MESSAGES = 1024
MAX_REQUEST_ID_BYTES = 256          # echoed in every response message and log line
MAX_MODEL_NAME_BYTES = 256
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256                # each stop string
MAX_STOP_TOKEN_IDS = 256
QUOTE_CHARS = 64


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """`value` as an error message may show it: its repr, cut to `limit` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_bytes(value: str, limit: int, field: str) -> None:
    # a character is at least one byte: a long string fails before it is encoded
    if len(value) > limit:
        raise InvalidRequest(field, f"is at least {len(value)} bytes; the limit is {limit}")
    if (n := len(value.encode("utf-8", "surrogatepass"))) > limit:
        raise InvalidRequest(field, f"is {n} bytes; the limit is {limit}")


def check_count(items, limit: int, field: str) -> None:
    if len(items) > limit:
        raise InvalidRequest(field, f"has {len(items)} items; the limit is {limit}")


def check_request_id(request_id: str, field: str = "request_id") -> str:
    check_bytes(request_id, MAX_REQUEST_ID_BYTES, field)
    if not (request_id.isascii() and request_id.isprintable()):   # gRPC metadata values are ASCII
        raise InvalidRequest(field, "must be printable ASCII (it travels in headers and logs)")
    return request_id


def check_sampling(temperature: float, top_p: float, top_k: int, max_tokens: int) -> None:
    """The numeric rules of SamplingParams (it calls this on construction; fields named as its own)."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise InvalidRequest("temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                                            f"got {temperature:g}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p:g}")
    if not 0 <= top_k <= INT32_MAX:
        raise InvalidRequest("top_k", f"must be >= 0 (0: off), got {top_k}")
    if not 1 <= max_tokens <= INT32_MAX:
        raise InvalidRequest("max_tokens", f"must be >= 1, got {max_tokens}")


def nested(prefix: str, error: InvalidRequest) -> InvalidRequest:
    """`error` with its field as the request spells it (e.g. temperature -> params.temperature)."""
    return InvalidRequest(f"{prefix}{error.field}", str(error).removeprefix(f"{error.field}: "))


def check_ids(ids, vocab_size: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_prompt_ids(ids, max_model_len: int, vocab_size: int, field: str) -> None:
    """Non-empty, leaves room for one new token, every id in the vocabulary (the length is
    checked first, so an oversized prompt is refused without a scan)."""
    if not ids:
        raise InvalidRequest(field, "is empty")
    if len(ids) >= max_model_len:
        raise InvalidRequest(field, f"has {len(ids)} tokens; the context window is {max_model_len} "
                                    f"and must leave room for one new token")
    check_ids(ids, vocab_size, field)


def check_max_tokens(max_tokens: int, prompt_len: int, max_model_len: int,
                     field: str = "params.max_tokens") -> None:
    room = max_model_len - prompt_len
    if max_tokens > room:
        raise InvalidRequest(field, f"{max_tokens} is above the {room} tokens left in the context window "
                                    f"of {max_model_len} after a {prompt_len}-token prompt")


def check_stop_token_ids(ids, vocab_size: int, field: str = "stop_token_ids") -> None:
    check_count(ids, MAX_STOP_TOKEN_IDS, field)
    check_ids(ids, vocab_size, field)
