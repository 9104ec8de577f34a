"""The model name a target reports and a gateway shows: --served-model-name, else the model
directory's name; never the path."""
import grpc

from pearl_runtime.client import list_models
from pearl_runtime.pb import target_pb2, target_pb2_grpc
from tests.services.procs import free_port, run


def _info(address: str):
    with grpc.insecure_channel(address) as ch:
        return target_pb2_grpc.TargetStub(ch).Info(target_pb2.InfoRequest(), timeout=10)


def test_a_target_reports_its_served_name_and_never_its_path(cluster):
    plain = cluster.stack(None, "ar")
    assert _info(plain.target.address).model == plain.target_model.name
    assert run(list_models(plain.gateway.address)) == [plain.target_model.name]

    named = cluster.service("target", cluster.engine_args(cluster.target_model) + [
        "--mode", "ar", "--draft", f"127.0.0.1:{free_port()}", "--served-model-name", "tiny-chat"], "target-named")
    gateway = cluster.service("gateway", ["--model", str(cluster.target_model), "--targets", named.address],
                              "gateway-named")
    cluster.launch([named, gateway])
    assert _info(named.address).model == "tiny-chat"
    assert run(list_models(gateway.address)) == ["tiny-chat"]
