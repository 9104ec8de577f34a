"""Bad model directories and bad requests give clear errors that name the culprit."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine, load_tokenizer
from pearl_runtime.errors import InvalidRequest, ModelLoadError
from pearl_runtime.sampling import SamplingParams


@pytest.fixture
def model_copy(llama_dir, tmp_path):
    """A writable copy of the tiny llama checkpoint."""
    d = tmp_path / "model"
    shutil.copytree(llama_dir, d)
    return d


def load(d, **kw):
    return LLMEngine(EngineConfig(model=str(d), num_blocks=64, **kw), load_tok=False)


def edit_weights(d, fn):
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight",
                                  "model.layers.0.self_attn.k_proj.weight",   # packed into qkv_proj
                                  "model.layers.1.mlp.gate_proj.weight",      # packed into gate_up_proj
                                  "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"])
def test_missing_weight_is_named(model_copy, name):
    edit_weights(model_copy, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match="missing weight") as e:
        load(model_copy)
    assert repr(name) in str(e.value) or name in str(e.value), str(e.value)


@pytest.mark.parametrize("name,change", [
    ("model.layers.0.mlp.up_proj.weight", lambda t: t[:-1]),
    ("model.layers.1.self_attn.v_proj.weight", lambda t: t[:-1]),
    ("model.layers.0.input_layernorm.weight", lambda t: t[:-1]),
    ("model.embed_tokens.weight", lambda t: t[:-1]),
    # shapes that torch would silently broadcast into the parameter
    ("model.layers.0.self_attn.o_proj.weight", lambda t: t[:1]),
    ("model.layers.0.self_attn.q_proj.weight", lambda t: t[:1]),
    ("model.layers.1.mlp.up_proj.weight", lambda t: t[:, :1]),
    ("model.layers.0.mlp.down_proj.weight", lambda t: t[0]),     # 1-D where 2-D is sharded
    ("lm_head.weight", lambda t: t[:1]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_shape_mismatch_names_tensor_and_file(model_copy, name, change):
    def shrink(t):
        t[name] = change(t[name]).contiguous()
    edit_weights(model_copy, shrink)
    with pytest.raises(ModelLoadError) as e:
        load(model_copy)
    msg = str(e.value)
    assert name in msg and "model.safetensors" in msg and "shape" in msg, msg


def test_unexpected_tensor_is_named(model_copy):
    edit_weights(model_copy, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.extra\.weight"):
        load(model_copy)


def test_unsupported_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load(model_copy)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


def test_missing_or_invalid_config(model_copy, tmp_path):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load(model_copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load(empty)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "no_files"])
def test_corrupt_safetensors(model_copy, damage):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage_header":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}" + data[24:])
    else:
        path.unlink()
    with pytest.raises(ModelLoadError) as e:
        load(model_copy)
    msg = str(e.value)
    assert ("model.safetensors" in msg) if damage != "no_files" else ("safetensors" in msg), msg


def test_missing_tokenizer(model_copy):
    for f in model_copy.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(str(model_copy))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        LLMEngine(EngineConfig(model=str(model_copy), num_blocks=64))


def test_prompt_errors(llama_dir):
    eng = LLMEngine(EngineConfig(model=str(llama_dir), num_blocks=64, max_model_len=100), load_tok=False)
    for bad, words in [(list(range(100)), "100 tokens"), (list(range(250)), "250 tokens"),
                       ([], "empty"), ([1, 2, 10**6], "1000000")]:
        with pytest.raises(InvalidRequest) as e:
            eng.add(bad)
        assert e.value.field == "prompt" and words in str(e.value), str(e.value)
    eng.add(list(range(99)))      # one short of the window: accepted
    assert eng.scheduler.has_work()


@pytest.mark.parametrize("kw,field", [({"temperature": -0.1}, "temperature"),
                                      ({"temperature": float("nan")}, "temperature"),
                                      ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                      ({"top_p": float("nan")}, "top_p"),
                                      ({"top_k": -1}, "top_k"),
                                      ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens")])
def test_invalid_sampling_params(kw, field):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.field == field
    assert str(e.value).startswith(field)


def shard(src, dst, names_in_first):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    files = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    weight_map = {}
    for name, t in tensors.items():
        f = "model-00001-of-00002.safetensors" if names_in_first(name) else "model-00002-of-00002.safetensors"
        files[f][name] = t
        weight_map[name] = f
    for f, ts in files.items():
        save_file(ts, str(dst / f), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_checkpoint_loads_and_matches(qwen2_dir, tmp_path):
    # split mid-layer so one layer's q/k/v and gate/up land in different files
    sharded = shard(qwen2_dir, tmp_path / "sharded",
                    lambda n: "layers.1" not in n and "k_proj" not in n and "up_proj" not in n)
    prompts = [list(range(3, 40)), [7]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = load(qwen2_dir)
    ours = load(sharded)
    for (a, b) in zip(ref.runner.model.state_dict().values(), ours.runner.model.state_dict().values()):
        assert torch.equal(a, b)
    assert ours.generate(prompts, params) == ref.generate(prompts, params)


def test_sharded_index_missing_file(qwen2_dir, tmp_path):
    sharded = shard(qwen2_dir, tmp_path / "sharded", lambda n: "layers.1" not in n)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError) as e:
        load(sharded)
    assert "model-00002-of-00002.safetensors" in str(e.value)


def test_sharded_index_invalid(qwen2_dir, tmp_path):
    sharded = shard(qwen2_dir, tmp_path / "sharded", lambda n: "layers.1" not in n)
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ModelLoadError, match="index"):
        load(sharded)
