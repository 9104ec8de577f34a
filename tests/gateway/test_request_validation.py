import math

import pytest

from gateway.job import ChatMessage, Request, TargetInfo
from gateway.validation import validate
from pearl_runtime.errors import InvalidRequest

INFO = TargetInfo(model="tiny", vocab_size=451, max_model_len=64, eos_token_ids=(450,))


def field_of(req: Request, tokenizer, info=INFO) -> str:
    with pytest.raises(InvalidRequest) as e:
        validate(req, tokenizer, info)
    assert str(e.value).startswith(e.value.field + ": ")   # the message names the field too
    return e.value.field


@pytest.mark.parametrize("req, field", [
    (Request(), "prompt"),
    (Request(text=""), "prompt"),
    (Request(token_ids=()), "prompt"),
    (Request(chat=()), "prompt.chat.messages"),
    (Request(chat=(ChatMessage("user", "hi"), ChatMessage("bot", "hello"))), "prompt.chat.messages"),
    (Request(text="hi", model="llama-70b"), "model"),
    (Request(text="hi", temperature=-0.1), "params.temperature"),
    (Request(text="hi", temperature=math.nan), "params.temperature"),
    (Request(text="hi", top_p=0.0), "params.top_p"),
    (Request(text="hi", top_p=1.01), "params.top_p"),
    (Request(text="hi", top_k=-1), "params.top_k"),
    (Request(text="hi", max_tokens=0), "params.max_tokens"),
    (Request(text="hi", max_tokens=-5), "params.max_tokens"),
    (Request(token_ids=(1,) * 10, max_tokens=55), "params.max_tokens"),   # 10 + 55 > 64
    (Request(token_ids=(1,) * 64), "prompt"),                             # no room for one token
    (Request(token_ids=(1, 451)), "prompt.tokens.ids"),
    (Request(token_ids=(-1, 2)), "prompt.tokens.ids"),
    (Request(text="hi", stop_token_ids=(9999,)), "stop_token_ids"),
    (Request(text="hi", stop=("",)), "stop"),
])
def test_each_rule_names_its_field(tokenizer, req, field):
    assert field_of(req, tokenizer) == field


def test_defaults(tokenizer):
    info = TargetInfo(model="tiny", vocab_size=451, max_model_len=4096)
    job = validate(Request(text="Hello world"), tokenizer, info)
    p = job.params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed, p.ignore_eos) == (0, 1, 0, 128, None, False)
    assert job.prompt_ids == tuple(tokenizer.encode("Hello world"))
    assert len(job.request_id) == 32


def test_unset_max_tokens_shrinks_to_the_window_left(tokenizer):
    job = validate(Request(token_ids=(1,) * 60), tokenizer, INFO)
    assert job.params.max_tokens == 4
    job = validate(Request(token_ids=(1,) * 63), tokenizer, INFO)
    assert job.params.max_tokens == 1
    job = validate(Request(token_ids=(1,) * 10, max_tokens=54), tokenizer, INFO)   # exactly fills it
    assert job.params.max_tokens == 54


def test_explicit_values_pass_through(tokenizer):
    job = validate(Request(request_id="abc", model="tiny", token_ids=(5, 6), temperature=0.7, top_p=0.9,
                           top_k=20, max_tokens=8, seed=3, ignore_eos=True, stop=("\n",),
                           stop_token_ids=(449,)), tokenizer, INFO)
    assert job.request_id == "abc" and job.prompt_ids == (5, 6) and job.stop == ("\n",)
    p = job.params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed, p.ignore_eos, p.stop_token_ids) == \
        (pytest.approx(0.7), pytest.approx(0.9), 20, 8, 3, True, (449,))


def test_chat_uses_the_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    job = validate(Request(chat=tuple(ChatMessage(**m) for m in msgs)), tokenizer,
                   TargetInfo(model="tiny", vocab_size=451, max_model_len=4096))
    rendered = tokenizer.decode(list(job.prompt_ids))
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"


def test_chat_without_template_is_refused(tokenizer):
    import copy
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    assert field_of(Request(chat=(ChatMessage("user", "hi"),)), plain) == "prompt.chat"
