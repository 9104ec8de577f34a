"""Shared fixtures: tiny checkpoints built once per session.

Import helpers as `from tests.tiny_models import ...` (the repo root is put on sys.path here)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.tiny_models import derive_draft, load_hf, make_tiny_model  # noqa: E402


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass


_quiet_transformers()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """make(arch="llama", seed=0, tie=False, **kw) -> Path of a tiny checkpoint; cached per
    argument set for the session (treat the directory as read-only; copy it to modify)."""
    cache: dict = {}

    def make(arch: str = "llama", seed: int = 0, tie: bool = False, **kw) -> Path:
        key = (arch, seed, tie, repr(sorted(kw.items())))
        if key not in cache:
            name = f"{arch}-s{seed}{'-tied' if tie else ''}-{len(cache)}"
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(name), arch, seed=seed, tie=tie, **kw)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def draft_factory(tmp_path_factory):
    """draft(target_dir, kind="perturbed", noise=0.3, seed=1) -> Path; cached per arguments."""
    cache: dict = {}

    def make(target_dir, kind: str = "perturbed", **kw) -> Path:
        key = (str(target_dir), kind, repr(sorted(kw.items())))
        if key not in cache:
            cache[key] = derive_draft(target_dir, tmp_path_factory.mktemp(f"draft-{kind}"), kind, **kw)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(model_dir) -> the transformers model (fp32, eval), loaded once per dir."""
    cache: dict = {}

    def load(model_dir):
        key = str(model_dir)
        if key not in cache:
            cache[key] = load_hf(model_dir)
        return cache[key]
    return load


@pytest.fixture(scope="session")
def llama_dir(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def qwen2_dir(tiny_model_factory):
    return tiny_model_factory("qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(tiny_model_factory):
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="session")
def qwen2_tied_dir(tiny_model_factory):
    return tiny_model_factory("qwen2", tie=True)


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3", "qwen2-tied"])
def any_model_dir(request, tiny_model_factory):
    """Parametrized over the three architectures and one tied-embedding variant."""
    arch, _, tied = request.param.partition("-")
    return tiny_model_factory(arch, tie=bool(tied))
