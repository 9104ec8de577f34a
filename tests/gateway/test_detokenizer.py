import random

import pytest

from gateway.detokenizer import Detokenizer, StopStrings

TEXTS = ["Hello world! How are you today?", "héllo wörld — naïve café", "你好，世界 🙂🚀 ok",
         "def f(x):\n    return x * 2  # ünïcödé", "🙂"]


def _stream(tokenizer, ids, chunks, stop=()):
    d = Detokenizer(tokenizer, stop)
    deltas = []
    i = 0
    for n in chunks:
        deltas.append(d.push(ids[i:i + n]))
        i += n
    deltas.append(d.finish())
    return d, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_never_emits_half_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any(tokenizer.decode([t]).endswith("\ufffd") for t in ids) or text.isascii()
    d, deltas = _stream(tokenizer, ids, [1] * len(ids))
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == d.text == tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("seed", range(5))
def test_random_chunks_concatenate_to_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = tokenizer.encode(" ".join(TEXTS))
    ids[5:5] = [tokenizer.convert_tokens_to_ids("<|im_end|>")]      # specials are skipped
    chunks = []
    while sum(chunks) < len(ids):
        chunks.append(rng.randint(1, 4))
    _, deltas = _stream(tokenizer, ids, chunks)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_incomplete_character_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("a你")[:-1]          # 'a' and the first bytes of 你
    d = Detokenizer(tokenizer)
    assert d.push(ids) == "a"
    assert d.finish() == tokenizer.decode(ids)[1:]
    assert d.text == tokenizer.decode(ids)


def test_stop_string_spanning_deltas_is_cut_and_held_back(tokenizer):
    text = "Hello world! How are you?"
    ids = tokenizer.encode(text)
    d = Detokenizer(tokenizer, stop=["world!"])
    emitted = ""
    for t in ids:
        emitted += d.push([t])
        seen = tokenizer.decode(ids[:ids.index(t) + 1])
        # never emit a prefix of the stop string while it may still complete
        assert not emitted.endswith(("w", "wo", "wor", "worl", "world"))
        if d.stopped:
            break
        assert len(seen) - len(emitted) <= len("world!") - 1
    assert d.stopped and d.text == "Hello " and emitted == "Hello "
    assert d.push(tokenizer.encode(" more")) == "" and d.finish() == ""


def test_false_start_of_stop_string_is_released(tokenizer):
    d = Detokenizer(tokenizer, stop=["wolf"])
    out = d.push(tokenizer.encode("a wo"))
    assert out == "a "                                  # "wo" might begin "wolf"
    out += d.push(tokenizer.encode("rd"))
    assert out == "a word"
    out += d.push(tokenizer.encode(" wol"))
    assert out == "a word "
    out += d.finish()                                   # the stream ended: it was just text
    assert out == d.text == "a word wol" and not d.stopped


def test_earliest_of_several_stop_strings_wins():
    s = StopStrings(["yz", "bc", "abcd"])
    assert s.feed("xab") == "x"                         # "ab" may begin "abcd"
    assert s.feed("cdyz") == "" and s.matched == "abcd"
    s = StopStrings(["yz", "bc"])
    assert s.feed("xabcdyz") == "xa" and s.matched == "bc"


def test_stop_string_at_the_very_start():
    s = StopStrings(["<end>"])
    assert s.feed("<en") == ""
    assert s.feed("d> tail") == "" and s.matched == "<end>"
    assert s.flush() == ""


def test_no_stop_strings_passes_text_through():
    s = StopStrings([])
    assert s.feed("abc") == "abc" and s.flush() == ""


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Llama-2 style tokenizer: '▁' word marks, <0xNN> byte fallback, a decoder that strips
    the first leading space (so decoding a token alone loses its space)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "▁hello", "▁world", "!", "▁", "a"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[],
                               unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = {p: i for i, p in enumerate(pieces)}
    return fast, ids


def test_leading_spaces_survive_token_by_token_decoding(sentencepiece_like):
    tok, v = sentencepiece_like
    byte = lambda b: v[f"<0x{b:02X}>"]   # noqa: E731
    ids = [v["▁hello"], v["▁world"], v["!"], v["▁"]] + [byte(b) for b in "你".encode()] + [v["▁world"], v["a"]]
    d, deltas = _stream(tok, ids, [1] * len(ids))
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "hello world! 你 worlda"
