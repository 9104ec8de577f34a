"""The gateway's tokenizer: `tokenizers` plus a Jinja2 chat template, never transformers (or torch).

`from transformers import AutoTokenizer` imports torch whenever it is installed; the gateway needs
none of it. GatewayTokenizer reads the same files transformers reads and gives what the gateway
uses of a transformers fast tokenizer, with the same results:

    encode(text)                              == AutoTokenizer.encode(text)
    decode(ids, skip_special_tokens=True)     == AutoTokenizer.decode(ids, ..., clean_up_tokenization_spaces=False)
    apply_chat_template(msgs, add_generation_prompt=True)
                                              == AutoTokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    get_vocab()                               == AutoTokenizer.get_vocab()   (so tokenizer_hash agrees with
                                                 what target and draft compute)

The chat template renders in the sandboxed Jinja2 environment transformers sets up (trim_blocks,
lstrip_blocks, loopcontrols, its tojson, raise_exception, strftime_now), with the named special
tokens (bos_token, eos_token, ...) as variables, and the result is encoded without adding special
tokens (the template writes them).
"""
import json
from datetime import datetime
from pathlib import Path

from pearl_runtime.errors import ModelLoadError

# the named special tokens transformers passes to a chat template (its special_tokens_map)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _pick_template(value) -> str | None:
    """tokenizer_config's chat_template: one string, or a list of {name, template} (the 'default')."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


def read_chat_template(model_dir: Path, config: dict) -> str | None:
    """The model's chat template as transformers finds it: chat_template.jinja, else
    chat_template.json, else tokenizer_config.json's chat_template."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    legacy = _read_json(model_dir / "chat_template.json")
    if legacy.get("chat_template"):
        return _pick_template(legacy["chat_template"])
    return _pick_template(config.get("chat_template"))


def compile_template(source: str):
    """`source` compiled in the sandbox transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class GatewayTokenizer:
    """A model directory's tokenizer.json, tokenizer_config.json and chat template."""

    def __init__(self, tokenizer, config: dict | None = None, chat_template: str | None = None):
        self._tok = tokenizer               # a tokenizers.Tokenizer
        config = config or {}
        self.special_tokens = {n: t for n in SPECIAL_TOKEN_NAMES if (t := _token_text(config.get(n))) is not None}
        self.chat_template = chat_template
        self._template = None               # compiled on first use

    @classmethod
    def from_dir(cls, model_dir) -> "GatewayTokenizer":
        from tokenizers import Tokenizer
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory {model_dir} does not exist")
        if not path.is_file():
            raise ModelLoadError(f"no tokenizer in {model_dir}: the gateway needs tokenizer.json (a fast tokenizer)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:      # tokenizers raises a plain Exception on a corrupt file
            raise ModelLoadError(f"{path} is not a usable tokenizer: {e}") from e
        config = _read_json(model_dir / "tokenizer_config.json")
        special = _read_json(model_dir / "special_tokens_map.json")    # older saves keep them here
        config = {**{k: v for k, v in special.items() if k in SPECIAL_TOKEN_NAMES}, **config}
        return cls(tok, config, read_chat_template(model_dir, config))

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode holds it): a long prompt tokenizing on the
        # gateway's tokenizer thread leaves its event loop running
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("clean_up_tokenization_spaces is not supported: it rewrites across token boundaries")
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` (dicts of role and content), as text."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = compile_template(self.chat_template)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True):
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text
