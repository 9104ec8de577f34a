"""A Generate request's checks at the gateway: the shared field rules (pearl_runtime/validation.py)
plus what only the gateway sees (model name, stop strings, text and chat, tokenization).

Three steps, so the server can tokenize off its event loop: `check` (sizes and numbers, cheap,
before anything scans or tokenizes the prompt), `tokenize`, then `job` (the rules that need
the token ids). `validate` runs all three."""
import dataclasses
import uuid
from collections.abc import Mapping

from pearl_runtime import validation as rules
from pearl_runtime.errors import InvalidRequest
from pearl_runtime.rpc.params import DEFAULT_MAX_TOKENS
from pearl_runtime.sampling import SamplingParams

from gateway.job import Job, Request, TargetInfo

CHAT_ROLES = ("system", "user", "assistant")


def validate(req: Request, tokenizer, info: TargetInfo) -> Job:
    """Check and tokenize `req` against the served model."""
    params = check(req, info)
    return job(req, params, tokenize(req, tokenizer), info)


def check(req: Request, info: TargetInfo) -> SamplingParams:
    """Every rule that needs no tokenizer; the prompt's size is bounded before it is read."""
    rules.check_request_id(req.request_id)
    rules.check_bytes(req.model, rules.MAX_MODEL_NAME_BYTES, "model")
    if req.model and req.model != info.model:
        raise InvalidRequest("model", f"unknown model {rules.quote(req.model)}; this gateway serves {info.model!r}")
    params = _sampling(req)
    rules.check_count(req.stop, rules.MAX_STOP_STRINGS, "stop")
    for s in req.stop:
        if not s:
            raise InvalidRequest("stop", "stop strings must be non-empty")
        rules.check_bytes(s, rules.MAX_STOP_BYTES, "stop")
    rules.check_stop_token_ids(req.stop_token_ids, info.vocab_size)
    if req.token_ids is not None:
        if not req.token_ids:
            raise InvalidRequest("prompt", "token prompt is empty")
        _check_window(len(req.token_ids), info)   # before the ids are scanned
        rules.check_ids(req.token_ids, info.vocab_size, "prompt.tokens.ids")
    elif req.text is not None:
        if not req.text:
            raise InvalidRequest("prompt", "text prompt is empty")
        rules.check_bytes(req.text, rules.MAX_TEXT_BYTES, "prompt.text")
    elif req.chat is not None:
        _check_chat(req.chat)
    else:
        raise InvalidRequest("prompt", "one of text, chat or tokens is required")
    return params


def tokenize(req: Request, tokenizer) -> list[int]:
    """The prompt's token ids (a checked request; may take a while: the server runs it on a thread)."""
    if req.token_ids is not None:
        return list(req.token_ids)
    if req.text is not None:
        return tokenizer.encode(req.text)
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequest("prompt.chat", "the served model has no chat template; send text or tokens")
    out = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.chat],
                                        add_generation_prompt=True, tokenize=True)
    # transformers >= 5 returns a BatchEncoding, older versions a plain list
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def job(req: Request, params: SamplingParams, prompt: list[int], info: TargetInfo) -> Job:
    """The rules on the token ids (window, max_tokens), then the Job a target runs."""
    if req.token_ids is None:   # token prompts were checked before
        _check_window(len(prompt), info)
        rules.check_ids(prompt, info.vocab_size, "prompt")
    if req.max_tokens is None:
        # the default is a convenience, so it shrinks to fit; an explicit value is a promise we can't keep
        params = dataclasses.replace(params, max_tokens=min(DEFAULT_MAX_TOKENS, info.max_model_len - len(prompt)))
    else:
        rules.check_max_tokens(req.max_tokens, len(prompt), info.max_model_len)
    return Job(request_id=req.request_id or uuid.uuid4().hex, prompt_ids=tuple(prompt),
               params=params, stop=req.stop)


def _sampling(req: Request) -> SamplingParams:
    given = {k: v for k, v in dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                   max_tokens=req.max_tokens, seed=req.seed).items() if v is not None}
    try:
        return SamplingParams(**{"max_tokens": DEFAULT_MAX_TOKENS, **given}, ignore_eos=req.ignore_eos,
                              stop_token_ids=tuple(req.stop_token_ids))
    except InvalidRequest as e:   # SamplingParams names its own field; the client knows it as params.*
        raise rules.nested("params.", e) from None


def _check_window(prompt_len: int, info: TargetInfo) -> None:
    if prompt_len + 1 > info.max_model_len:
        raise InvalidRequest("prompt", f"{prompt_len} tokens leave no room for one new token in the "
                                       f"context window of {info.max_model_len}")


def _check_chat(chat) -> None:
    field = "prompt.chat.messages"
    if not chat:
        raise InvalidRequest(field, "chat prompt has no messages")
    rules.check_count(chat, rules.MAX_CHAT_MESSAGES, field)
    for i, m in enumerate(chat):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(field, f"message {i} has role {rules.quote(m.role)}; "
                                        f"must be one of {', '.join(CHAT_ROLES)}")
        rules.check_bytes(m.content, rules.MAX_TEXT_BYTES, f"{field}[{i}].content")
