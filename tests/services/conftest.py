"""Fixtures for the multi-process service tests (see tests/services/procs.py)."""
import pytest

from tests.services.procs import Cluster


@pytest.fixture(scope="session")
def service_models(draft_factory, llama_dir):
    """The target model and its drafts: copy, perturbed, unrelated (same tokenizer)."""
    return llama_dir, {kind: draft_factory(llama_dir, kind) for kind in ("copy", "perturbed", "unrelated")}


@pytest.fixture(scope="session")
def cluster(service_models, tmp_path_factory):
    target, drafts = service_models
    c = Cluster(target, drafts, tmp_path_factory.mktemp("service-logs"))
    try:
        yield c
    finally:
        c.stop()
