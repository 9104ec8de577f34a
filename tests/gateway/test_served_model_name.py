"""--served-model-name: the model name clients see (ListModels) and may ask for; without it the
name the targets report, a path shortened to its directory's name: clients never see a path."""
import grpc
import pytest

from gateway.__main__ import build_parser
from gateway.targets import public_model_name
from pearl_runtime.client import generate, list_models
from tests.gateway.fake_target import FakeTarget, expected_tokens
from tests.gateway.harness import gateway_over, run


def test_the_flag_defaults_from_its_variable(monkeypatch):
    assert build_parser().parse_args([]).served_model_name is None
    monkeypatch.setenv("PEARL_SERVED_MODEL_NAME", "smol")
    assert build_parser().parse_args([]).served_model_name == "smol"
    assert build_parser().parse_args(["--served-model-name", "x"]).served_model_name == "x"


def test_public_names():
    assert public_model_name("/models/smollm2-135m-instruct/") == "smollm2-135m-instruct"
    assert public_model_name("/models/a", "served") == "served"
    assert public_model_name("tiny") == "tiny"


@pytest.mark.parametrize("served, reported, shown", [
    ("smol", "/srv/models/SmolLM2", "smol"),       # the flag wins
    (None, "/srv/models/SmolLM2", "SmolLM2"),      # a target without the flag reports its --model
    (None, "smol-target", "smol-target"),          # the target's own --served-model-name
])
def test_list_models_and_requests_use_the_served_name(tokenizer_dir, served, reported, shown):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(model=reported), served_model_name=served) as (gw, _):
            assert await list_models(gw.address) == [shown]
            for model in (shown, ""):
                out = await generate(gw.address, token_ids=[1, 2], max_tokens=3, model=model, timeout_s=10)
                assert out.token_ids == expected_tokens(2, 3)
            for other in ("gpt-5", reported if reported != shown else "other"):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await generate(gw.address, token_ids=[1], max_tokens=3, model=other, timeout_s=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details().startswith("model: ")
                assert e.value.details().endswith(f"this gateway serves {shown!r}")    # never the path
            samples = [s for f in gw.metrics.registry.collect() if f.name == "pearl:generation_tokens"
                       for s in f.samples]
            assert {s.labels["model_name"] for s in samples} == {shown}
    run(body())
