"""Field rules for a Generate request: the first broken rule is an InvalidRequest naming its field."""
import dataclasses
import uuid
from collections.abc import Mapping

from pearl_runtime.errors import InvalidRequest
from pearl_runtime.rpc.params import DEFAULT_MAX_TOKENS
from pearl_runtime.sampling import SamplingParams

from gateway.job import Job, Request, TargetInfo

CHAT_ROLES = ("system", "user", "assistant")


def validate(req: Request, tokenizer, info: TargetInfo) -> Job:
    """Check and tokenize `req` against the served model; cheap rules run before tokenization."""
    if req.model and req.model != info.model:
        raise InvalidRequest("model", f"unknown model {req.model!r}; this gateway serves {info.model!r}")
    params = _sampling(req)
    if any(not s for s in req.stop):
        raise InvalidRequest("stop", "stop strings must be non-empty")
    _check_ids(req.stop_token_ids, info.vocab_size, "stop_token_ids")

    prompt = _prompt_ids(req, tokenizer)
    _check_ids(prompt, info.vocab_size, "prompt.tokens.ids" if req.token_ids is not None else "prompt")
    if len(prompt) + 1 > info.max_model_len:
        raise InvalidRequest("prompt", f"{len(prompt)} tokens leave no room for one new token in the "
                                       f"context window of {info.max_model_len}")
    room = info.max_model_len - len(prompt)
    if req.max_tokens is None:
        # the default is a convenience, so it shrinks to fit; an explicit value is a promise we can't keep
        params = dataclasses.replace(params, max_tokens=min(DEFAULT_MAX_TOKENS, room))
    elif req.max_tokens > room:
        raise InvalidRequest("params.max_tokens",
                             f"{req.max_tokens} is above the {room} tokens left in the context window "
                             f"of {info.max_model_len} after a {len(prompt)}-token prompt")
    return Job(request_id=req.request_id or uuid.uuid4().hex, prompt_ids=tuple(prompt),
               params=params, stop=req.stop)


def _sampling(req: Request) -> SamplingParams:
    given = {k: v for k, v in dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                   max_tokens=req.max_tokens, seed=req.seed).items() if v is not None}
    try:
        return SamplingParams(**{"max_tokens": DEFAULT_MAX_TOKENS, **given}, ignore_eos=req.ignore_eos,
                              stop_token_ids=tuple(req.stop_token_ids))
    except InvalidRequest as e:   # SamplingParams names its own field; the client knows it as params.*
        raise InvalidRequest(f"params.{e.field}", str(e).removeprefix(f"{e.field}: ")) from None


def _prompt_ids(req: Request, tokenizer) -> list[int]:
    if req.token_ids is not None:
        if not req.token_ids:
            raise InvalidRequest("prompt", "token prompt is empty")
        return list(req.token_ids)
    if req.text is not None:
        if not req.text:
            raise InvalidRequest("prompt", "text prompt is empty")
        return tokenizer.encode(req.text)
    if req.chat is not None:
        return _chat_ids(req, tokenizer)
    raise InvalidRequest("prompt", "one of text, chat or tokens is required")


def _chat_ids(req: Request, tokenizer) -> list[int]:
    field = "prompt.chat.messages"
    if not req.chat:
        raise InvalidRequest(field, "chat prompt has no messages")
    for i, m in enumerate(req.chat):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(field, f"message {i} has role {m.role!r}; must be one of {', '.join(CHAT_ROLES)}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequest("prompt.chat", "the served model has no chat template; send text or tokens")
    out = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.chat],
                                        add_generation_prompt=True, tokenize=True)
    # transformers >= 5 returns a BatchEncoding, older versions a plain list
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _check_ids(ids, vocab_size: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")
