"""The gateway's bounds: sizes checked before tokenization, numeric edge cases refused, errors
that quote input cut short, an undecodable request seen by the servicer (not gRPC's UNKNOWN)."""
import math

import pytest

from gateway.job import ChatMessage, Request, TargetInfo
from gateway.public_port import Undecodable, _decoder
from gateway.validation import validate
from pearl_runtime import validation as rules
from pearl_runtime.errors import InvalidRequest
from pearl_runtime.pb import gateway_pb2

INFO = TargetInfo(model="tiny", vocab_size=451, max_model_len=64, eos_token_ids=(450,))


class NoTokenizer:
    """Fails the test if anything tokenizes: a refused request must not get that far."""
    chat_template = "{{ messages }}"

    def encode(self, text):
        raise AssertionError("tokenized a request that its size rules refuse")

    apply_chat_template = encode


def refusal(req: Request, tokenizer=NoTokenizer()) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        validate(req, tokenizer, INFO)
    return e.value


BIG = rules.MAX_TEXT_BYTES + 1


@pytest.mark.parametrize("req, field", [
    (Request(text="hi", request_id="r" * (rules.MAX_REQUEST_ID_BYTES + 1)), "request_id"),
    (Request(text="hi", request_id="a\nb"), "request_id"),
    (Request(text="hi", request_id="r\u00e9q"), "request_id"),       # printable, but not ASCII: no header holds it
    (Request(text="hi", model="m" * (rules.MAX_MODEL_NAME_BYTES + 1)), "model"),
    (Request(text="hi", stop=("x",) * (rules.MAX_STOP_STRINGS + 1)), "stop"),
    (Request(text="hi", stop=("s" * (rules.MAX_STOP_BYTES + 1),)), "stop"),
    (Request(text="hi", stop_token_ids=(1,) * (rules.MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids"),
    (Request(text="a" * BIG), "prompt.text"),
    (Request(text="é" * (BIG // 2 + 1)), "prompt.text"),     # under the limit in characters, over it in bytes
    (Request(chat=(ChatMessage("user", "hi"),) * (rules.MAX_CHAT_MESSAGES + 1)), "prompt.chat.messages"),
    (Request(chat=(ChatMessage("user", "hi"), ChatMessage("user", "a" * BIG))), "prompt.chat.messages[1].content"),
    (Request(token_ids=(1,) * 100_000), "prompt"),
])
def test_sizes_are_refused_before_tokenization_naming_the_field(req, field):
    e = refusal(req)
    assert e.field == field and str(e).startswith(field + ": ")
    assert len(str(e)) < 200, str(e)


@pytest.mark.parametrize("value", [1e-45, 1e-30, 1e-6, math.inf, -math.inf, math.nan, 1e30, 100.5, -0.5])
def test_edge_case_temperatures_are_refused(value, tokenizer):
    assert refusal(Request(token_ids=(5, 6), temperature=value), tokenizer).field == "params.temperature"


@pytest.mark.parametrize("value", [0.0, rules.MIN_TEMPERATURE, 0.7, rules.MAX_TEMPERATURE])
def test_temperatures_in_bounds_pass(value, tokenizer):
    assert validate(Request(token_ids=(5, 6), temperature=value), tokenizer, INFO).params.temperature == value


@pytest.mark.parametrize("field, value", [("top_p", math.nan), ("top_p", math.inf), ("top_p", -1.0),
                                          ("top_k", -1), ("top_k", 2**31), ("max_tokens", 2**31)])
def test_other_numeric_edges_are_refused(field, value, tokenizer):
    assert refusal(Request(token_ids=(5, 6), **{field: value}), tokenizer).field == f"params.{field}"


def test_a_denormal_top_p_is_valid_and_keeps_the_top_token(tokenizer):
    job = validate(Request(token_ids=(5, 6), temperature=1.0, top_p=1e-45), tokenizer, INFO)
    assert job.params.top_p == 1e-45


def test_errors_quote_input_cut_short():
    e = refusal(Request(text="hi", model="m" * 200))
    assert "m" * rules.QUOTE_CHARS in str(e) and "m" * (rules.QUOTE_CHARS + 1) not in str(e)
    e = refusal(Request(chat=(ChatMessage("r" * 100_000, "hi"),)))
    assert e.field == "prompt.chat.messages" and len(str(e)) < 250


def test_bytes_that_are_not_a_request_reach_the_servicer():
    decode = _decoder(gateway_pb2.GenerateRequest)
    bad = decode(b"\xff\xff\xff\xff")
    assert isinstance(bad, Undecodable) and bad.message_type == "pearl.v1.GenerateRequest"
    good = decode(gateway_pb2.GenerateRequest(text="hi").SerializeToString())
    assert good.text == "hi"
