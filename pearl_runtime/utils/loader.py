"""Load HF safetensors checkpoints (single file or sharded with an index) into a model,
with errors that name the tensor and the file."""
import json
from pathlib import Path

from safetensors import safe_open
from torch import nn

from pearl_runtime.errors import ModelLoadError


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
        files = [model_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index} lists {f.name}, which is missing from {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {model_dir}")
    return files


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    model_dir = Path(model_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    tied = model.cfg.tie_word_embeddings
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            names = list(handle.keys())
        except Exception as e:  # safetensors raises several error types for bad headers
            raise ModelLoadError(f"corrupt or truncated safetensors file {path}: {e}") from e
        for name in names:
            if tied and name == "lm_head.weight":
                continue   # tied checkpoints sometimes also store the head
            if name.endswith("rotary_emb.inv_freq"):
                continue
            try:
                tensor = handle.get_tensor(name)
            except Exception as e:
                raise ModelLoadError(f"corrupt or truncated safetensors file {path}: cannot read {name}: {e}") from e
            target, shard = name, None
            for ckpt_part, (ours, shard_id) in packed.items():
                if f".{ckpt_part}." in name:
                    target, shard = name.replace(ckpt_part, ours), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise ModelLoadError(f"unexpected tensor {name!r} in {path.name}: the model has no such weight")
            loader = getattr(param, "weight_loader", None)
            try:
                if loader is None:
                    if tuple(param.shape) != tuple(tensor.shape):
                        raise RuntimeError("shape")
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor.to(param.dtype), shard)
            except (RuntimeError, IndexError) as e:   # IndexError: too few dimensions to shard
                raise ModelLoadError(f"tensor {name!r} in {path.name} has shape {tuple(tensor.shape)}, "
                                     f"which does not fit the model's {target} {tuple(param.shape)}") from e
            loaded.add(target if shard is None else f"{target}#{shard}")
    expected = set()
    for pname in params:
        if tied and pname == "lm_head.weight":
            continue
        base = pname.rsplit(".", 1)[0]
        shards = {sid for part, (ours, sid) in packed.items() if base.endswith(ours)}
        expected |= {f"{pname}#{s}" for s in shards} if shards else {pname}
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"missing weight {_ckpt_name(missing[0], packed)!r} in {model_dir} "
                             f"({len(missing)} missing in all)")


def _ckpt_name(name: str, packed: dict) -> str:
    if "#" not in name:
        return name
    pname, shard = name.split("#")
    for part, (ours, sid) in packed.items():
        if ours in pname and str(sid) == shard:
            return pname.replace(ours, part)
    return name
