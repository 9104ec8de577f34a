"""A model directory checked before a service opens its port: missing, incomplete, corrupt or
unsupported shows at process start, naming the path, not later inside the engine's load."""
from pathlib import Path

from pearl_runtime.errors import ModelLoadError

# what transformers' AutoTokenizer can build a tokenizer from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory")
    return path


def check_model_dir(model_dir, fast_tokenizer: bool = False) -> None:
    """config.json (valid, a supported architecture), the safetensors weights and a tokenizer
    (`fast_tokenizer`: tokenizer.json, all the gateway reads)."""
    from pearl_runtime.config import ModelConfig
    from pearl_runtime.utils.loader import checkpoint_files
    path = check_dir(model_dir)
    config = path / "config.json"
    try:
        ModelConfig.from_dir(path)
    except ModelLoadError as e:
        if str(path) in str(e):
            raise
        raise ModelLoadError(f"{config}: {e}") from e   # the checks of its values name no file
    except (KeyError, TypeError, ValueError) as e:   # a field missing or of the wrong type
        raise ModelLoadError(f"{config} is not a usable model config: {type(e).__name__}: {e}") from e
    checkpoint_files(path)
    if fast_tokenizer and not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"no tokenizer in {path}: the gateway needs tokenizer.json (a fast tokenizer)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer in {path}: need one of {', '.join(TOKENIZER_FILES)}")
