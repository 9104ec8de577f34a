"""inference.GRPCInferenceService (KServe v2 with Triton's streaming extension) on the gateway's
port: the model contract of Triton's vLLM backend, converted to and from gateway/generation.py.

Inputs: text_input (BYTES [1]), stream (BOOL), sampling_parameters (BYTES, a JSON object),
exclude_input_in_output (BOOL); sampling fields may also come as request parameters. Outputs:
text_output (only the new text when streaming), finish_reason, num_input_tokens,
num_output_tokens."""
import asyncio
import contextlib
import json
import struct
from dataclasses import dataclass

import grpc

from pearl_runtime.errors import InvalidRequest, PearlError
from pearl_runtime.pb import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc, model_config_pb2 as mc
from pearl_runtime.rpc.health import Health
from pearl_runtime.rpc.status import Unavailable, abort
from pearl_runtime.validation import check_request_id

from gateway.generation import Delta, Final, Generation, renamed, sampling_from_json
from gateway.job import Request

SERVER_NAME = "pearl-serve"
VERSION = "1"       # the one version of the served model
EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL_FLAG = "triton_final_response"

# name: (datatype, shape, Triton config type)
INPUTS = {
    "text_input": ("BYTES", [1], mc.TYPE_STRING),
    "stream": ("BOOL", [1], mc.TYPE_BOOL),
    "sampling_parameters": ("BYTES", [1], mc.TYPE_STRING),
    "exclude_input_in_output": ("BOOL", [1], mc.TYPE_BOOL),
}
OUTPUTS = {
    "text_output": ("BYTES", [-1], mc.TYPE_STRING),
    "finish_reason": ("BYTES", [-1], mc.TYPE_STRING),
    "num_input_tokens": ("UINT32", [1], mc.TYPE_UINT32),
    "num_output_tokens": ("UINT32", [1], mc.TYPE_UINT32),
}
# our field names as a KServe client knows them
CLIENT_NAMES = {"params": "sampling_parameters", "stop": "sampling_parameters.stop",
                "prompt": "text_input", "request_id": "id", "model": "model_name"}


@dataclass(frozen=True)
class Call:
    """One ModelInferRequest read: the Request and what shapes its answers."""
    id: str
    request: Request
    stream: bool
    exclude_input: bool
    empty_final: bool
    outputs: tuple[str, ...]


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, generation: Generation, health: Health):
        self._generation = generation
        self._router = generation.router
        self._health = health

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._health.serving)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._health.serving and self._is_ours(request.name, request.version))

    async def ServerMetadata(self, request, context):
        from importlib.metadata import version
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=version("pearl-serve"),
                                         extensions=["model_configuration"])

    async def ModelMetadata(self, request, context):
        name = await self._model(request.name, request.version, context)
        return pb.ModelMetadataResponse(
            name=name, versions=[VERSION], platform=SERVER_NAME,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=k, datatype=d, shape=s)
                    for k, (d, s, _) in INPUTS.items()],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=k, datatype=d, shape=s)
                     for k, (d, s, _) in OUTPUTS.items()])

    async def ModelConfig(self, request, context):
        name = await self._model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=name, platform=SERVER_NAME, backend=SERVER_NAME, max_batch_size=0,
            input=[mc.ModelInput(name=k, data_type=t, dims=s, optional=k != "text_input")
                   for k, (_, s, t) in INPUTS.items()],
            output=[mc.ModelOutput(name=k, data_type=t, dims=s) for k, (_, s, t) in OUTPUTS.items()],
            # decoupled: any number of responses per request, so clients stream
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True)))

    async def ModelInfer(self, request, context):
        try:
            call = _read(request)
            if call.stream:
                raise InvalidRequest("stream", "ModelInfer answers once; stream with ModelStreamInfer")
            async with self._generate(call, context) as outs:
                async for out in outs:
                    if isinstance(out, Final):
                        return _response(self._router.model, call, _whole_text(call, out), out)
        except PearlError as e:
            await abort(context, renamed_error(e))

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request runs on its own; their responses share the stream, matched by id. A
        failed request is one error_message; the stream goes on. Ending the stream cancels
        every request still running."""
        answers: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def read_all():
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._stream_one(request, context, answers))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:      # half-closed: the requests sent still finish
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _stream_one(self, request, context, answers: asyncio.Queue) -> None:
        try:
            call = _read(request)
            async with self._generate(call, context) as outs:
                async for out in outs:
                    if isinstance(out, Delta):
                        if call.stream and out.text:
                            answers.put_nowait(_stream_answer(
                                _response(self._router.model, call, out.text, None, final=False)))
                        continue
                    text = "" if call.stream else _whole_text(call, out)
                    answers.put_nowait(_stream_answer(
                        _response(self._router.model, call, text, out, final=not call.empty_final)))
                    if call.empty_final:
                        answers.put_nowait(_stream_answer(pb.ModelInferResponse(
                            model_name=self._router.model, model_version=VERSION, id=call.id,
                            parameters={FINAL_FLAG: pb.InferParameter(bool_param=True)})))
        except PearlError as e:
            answers.put_nowait(pb.ModelStreamInferResponse(
                error_message=str(renamed_error(e)), infer_response=pb.ModelInferResponse(id=request.id)))

    @contextlib.asynccontextmanager
    async def _generate(self, call: Call, context):
        def ended() -> str:
            left = context.time_remaining()
            return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"

        meta = dict(context.invocation_metadata() or ())
        async with contextlib.aclosing(self._generation.stream(call.request, meta.get("traceparent", ""),
                                                               ended)) as outs:
            yield outs

    def _is_ours(self, name: str, version: str) -> bool:
        return name == self._router.model and version in ("", VERSION)

    async def _model(self, name: str, version: str, context) -> str:
        try:
            if not self._router.model:
                raise Unavailable("the served model is not known yet: no target has answered")
            if name != self._router.model:
                raise InvalidRequest("name", f"unknown model {name!r}; this server serves {self._router.model!r}")
            if version not in ("", VERSION):
                raise InvalidRequest("version", f"unknown version {version!r}; the model has version {VERSION}")
        except PearlError as e:
            await abort(context, e)
        return name


def renamed_error(error: PearlError) -> PearlError:
    return renamed(error, CLIENT_NAMES) if isinstance(error, InvalidRequest) else error


def _read(msg: pb.ModelInferRequest) -> Call:
    """A ModelInferRequest as a Call; INVALID_ARGUMENT names what does not fit the contract."""
    if msg.model_version not in ("", VERSION):
        raise InvalidRequest("model_version", f"unknown version {msg.model_version!r}; the model has version {VERSION}")
    if msg.raw_input_contents and len(msg.raw_input_contents) != len(msg.inputs):
        raise InvalidRequest("raw_input_contents", f"has {len(msg.raw_input_contents)} entries for "
                                                   f"{len(msg.inputs)} inputs")
    values: dict = {}
    for i, tensor in enumerate(msg.inputs):
        if tensor.name not in INPUTS:
            raise InvalidRequest(f"inputs.{tensor.name}", f"is not an input of this model ({', '.join(INPUTS)})")
        datatype = INPUTS[tensor.name][0]
        if tensor.datatype != datatype:
            raise InvalidRequest(f"inputs.{tensor.name}", f"has datatype {tensor.datatype}; must be {datatype}")
        raw = msg.raw_input_contents[i] if msg.raw_input_contents else None
        elements = _elements(tensor, raw, datatype)
        if len(elements) != 1:
            raise InvalidRequest(f"inputs.{tensor.name}", f"has {len(elements)} elements; must have 1")
        values[tensor.name] = elements[0]
    if "text_input" not in values:
        raise InvalidRequest("inputs.text_input", "is required")
    try:
        text = values["text_input"].decode()
    except UnicodeDecodeError:
        raise InvalidRequest("inputs.text_input", "is not UTF-8") from None

    fields, empty_final = {}, False
    for key, p in msg.parameters.items():
        if key == EMPTY_FINAL:
            empty_final = p.bool_param
        elif not key.startswith("triton_"):     # Triton's own (sequence, priority) have no meaning here
            fields[key] = getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None
    sampling = {**sampling_from_json(fields, "parameters"), **_sampling_json(values.get("sampling_parameters"))}
    request_id = check_request_id(msg.id, "id")
    requested = tuple(o.name for o in msg.outputs) or tuple(OUTPUTS)
    for name in requested:
        if name not in OUTPUTS:
            raise InvalidRequest(f"outputs.{name}", f"is not an output of this model ({', '.join(OUTPUTS)})")
    return Call(msg.id, Request(request_id=request_id, model=msg.model_name, text=text, **sampling),
                stream=bool(values.get("stream", False)), exclude_input=bool(values.get("exclude_input_in_output")),
                empty_final=empty_final, outputs=requested)


def _sampling_json(raw: bytes | None) -> dict:
    if raw is None:
        return {}
    try:
        fields = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest("sampling_parameters", f"is not JSON ({e})") from None
    if not isinstance(fields, dict):
        raise InvalidRequest("sampling_parameters", "must be a JSON object")
    return sampling_from_json(fields, "sampling_parameters")


def _elements(tensor, raw: bytes | None, datatype: str) -> list:
    if raw is None:
        return list(tensor.contents.bytes_contents if datatype == "BYTES" else tensor.contents.bool_contents)
    if datatype == "BOOL":
        return [b != 0 for b in raw]
    out, at = [], 0
    while at < len(raw):    # each element: a 4-byte little-endian length, then the bytes
        if at + 4 > len(raw):
            raise InvalidRequest(f"inputs.{tensor.name}", "raw contents end inside a length prefix")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise InvalidRequest(f"inputs.{tensor.name}", "raw contents are shorter than their length prefix")
        out.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    return out


def _whole_text(call: Call, final: Final) -> str:
    return final.text if call.exclude_input else call.request.text + final.text


def _response(model: str, call: Call, text: str, done: Final | None,
              final: bool | None = None) -> pb.ModelInferResponse:
    """text_output, plus the counts and finish reason once `done`; `final`: Triton's
    triton_final_response flag (streams only)."""
    values = {"text_output": ("BYTES", text.encode())}
    if done is not None:
        values |= {"finish_reason": ("BYTES", (done.finish_reason or "").encode()),
                   "num_input_tokens": ("UINT32", done.stats.prompt_tokens),
                   "num_output_tokens": ("UINT32", done.stats.new_tokens)}
    names = [n for n in call.outputs if n in values]
    msg = pb.ModelInferResponse(model_name=model, model_version=VERSION, id=call.id,
                                outputs=[pb.ModelInferResponse.InferOutputTensor(
                                    name=n, datatype=values[n][0], shape=[1]) for n in names],
                                raw_output_contents=[_raw(*values[n]) for n in names])
    if final is not None:
        msg.parameters[FINAL_FLAG].bool_param = final
    return msg


def _raw(datatype: str, value) -> bytes:
    return struct.pack("<I", len(value)) + value if datatype == "BYTES" else struct.pack("<I", value)


def _stream_answer(response: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=response)


def add_kserve_servicer(generation: Generation, health: Health, server: grpc.aio.Server) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(generation, health), server)
