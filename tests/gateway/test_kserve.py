"""inference.GRPCInferenceService on the gateway, through the real tritonclient (run as its own
program, test_kserve_tritonclient.py): the same greedy request gives the same text as pearl.v1."""
import asyncio
import json
import sys
from pathlib import Path

import grpc
import pytest

from pearl_runtime import client
from pearl_runtime.pb import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
from tests.gateway.fake_target import FakeTarget
from tests.gateway.harness import gateway_over, run

pytest.importorskip("tritonclient")
ROOT = Path(__file__).resolve().parents[2]


async def tritonclient_program(address: str, model: str, token: str = "") -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("test_kserve_tritonclient.py")), address, model, token,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out)


@pytest.mark.parametrize("token", ["", "s3cret"])
def test_tritonclient_matches_pearl_generate(tokenizer_dir, token):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(), auth_token=token or None) as (gw, _):
            seen = await tritonclient_program(gw.address, "tiny", token)
            ours = await client.generate(gw.address, "Hello", temperature=0.0, max_tokens=12,
                                         auth_token=token or None)
            return seen, ours
    seen, ours = run(body(), timeout_s=90)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["inputs"] == ["text_input", "stream", "sampling_parameters", "exclude_input_in_output"]
    assert seen["outputs"] == ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens"]
    assert seen["decoupled"] is True
    assert ours.text and seen["infer"]["text"] == ours.text
    assert seen["infer_with_prompt"] == "Hello" + ours.text
    assert seen["infer"]["finish_reason"] == ours.finish_reason == "length"
    assert seen["infer"]["num_input_tokens"] == ours.stats.prompt_tokens
    assert seen["infer"]["num_output_tokens"] == ours.stats.new_tokens == 12
    assert "sampling_parameters.temperature" in seen["infer_bad"]
    assert len(seen["stream"]["chunks"]) > 1 and "".join(seen["stream"]["chunks"]) == ours.text
    assert seen["stream"]["final_has_outputs"] is False      # the empty final response
    assert "sampling_parameters.top_k" in seen["stream_bad"]["error"]
    assert "".join(seen["stream_after_bad"]["chunks"]) == ours.text   # the stream stayed usable


def test_kserve_needs_the_token(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget(), auth_token="s3cret") as (gw, _):
            async with grpc.aio.insecure_channel(gw.address) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest())
                return e.value.code()
    assert run(body()) == grpc.StatusCode.UNAUTHENTICATED


def _request(request_id: str, prompt: str, sampling: dict) -> pb.ModelInferRequest:
    """A request with its BYTES in `contents` (tritonclient sends raw_input_contents)."""
    tensor = pb.ModelInferRequest.InferInputTensor
    return pb.ModelInferRequest(model_name="tiny", id=request_id, inputs=[
        tensor(name="text_input", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(
            bytes_contents=[prompt.encode()])),
        tensor(name="stream", datatype="BOOL", shape=[1], contents=pb.InferTensorContents(bool_contents=[True])),
        tensor(name="sampling_parameters", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(
            bytes_contents=[json.dumps(sampling).encode()]))])


def test_cancelling_a_stream_cancels_its_request(tokenizer_dir):
    async def body():
        fake = FakeTarget(step_s=0.02)
        async with gateway_over(tokenizer_dir, fake) as (gw, _):
            async with grpc.aio.insecure_channel(gw.address) as ch:
                requests: asyncio.Queue = asyncio.Queue()
                requests.put_nowait(_request("long", "Hello", {"max_tokens": 200, "ignore_eos": True}))

                async def sent():
                    while True:
                        yield await requests.get()

                call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(sent())
                first = await call.read()
                assert first.infer_response.id == "long" and not first.error_message
                call.cancel()
                await asyncio.sleep(0.3)
                return fake.cancels
    assert "long" in run(body())


def test_unknown_input_and_model_are_refused_naming_them(tokenizer_dir):
    async def body():
        async with gateway_over(tokenizer_dir, FakeTarget()) as (gw, _):
            async with grpc.aio.insecure_channel(gw.address) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                bad = _request("x", "Hello", {})
                bad.inputs.add(name="images", datatype="FP32", shape=[1])
                errors = []
                for req in (bad, pb.ModelInferRequest(model_name="other", inputs=_request("y", "Hi", {}).inputs[:1])):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.ModelInfer(req)
                    errors.append((e.value.code(), e.value.details()))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ModelMetadata(pb.ModelMetadataRequest(name="other"))
                errors.append((e.value.code(), e.value.details()))
                return errors
    (c1, m1), (c2, m2), (c3, m3) = run(body())
    assert c1 == c2 == c3 == grpc.StatusCode.INVALID_ARGUMENT
    assert m1.startswith("inputs.images") and m2.startswith("model_name") and m3.startswith("name")
