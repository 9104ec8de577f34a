"""deploy/k8s against a pinned Kubernetes schema (kubernetes-validate --strict, offline) and
against the code: probes are native gRPC on the containers' ports, selectors match labels,
the headless Services are the names --targets/--draft dial, grace periods outlast the drain
timeout, every container runs as non-root with a read-only root filesystem."""
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pearl_runtime.launch import MODULES

sys.path.insert(0, str(Path(__file__).parent))
from kustomize import key, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VARIANTS = {"base": K8S / "base", "colocated": K8S / "overlays" / "colocated"}
# the schema the manifests are validated against: gRPC probes are GA since 1.27
KUBERNETES_VERSION = "1.32.0"
DRAIN_S = 30.0   # the drain a stopping service may take: the grace periods must outlast it
NAMESPACE = "pearl-serve"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    return request.param, render(VARIANTS[request.param])


def pods(docs):
    """(workload, pod spec, pod labels) of every Deployment/StatefulSet/Job."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            t = d["spec"]["template"]
            yield d, t["spec"], t["metadata"].get("labels", {})


def parse(args: list[str]):
    if args[0] not in MODULES:
        from pearl_runtime.cli import build_parser
        return build_parser().parse_args(args)
    return importlib.import_module(f"{MODULES[args[0]]}.__main__").build_parser().parse_args(args[1:])


def pearl_containers(docs):
    """(workload, container, parsed args) of every container that runs a pearl service."""
    for w, spec, _ in pods(docs):
        for c in spec["containers"]:
            if c.get("args") and c["args"][0] in MODULES:
                yield w, c, parse(c["args"])


# -- schema -----------------------------------------------------------------------------------

def test_schema_strict(variant):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, docs = variant
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_catches_a_misspelled_field():
    """Without strict a misspelled field passes: make sure the check above would catch one."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = next(d for d in render(VARIANTS["base"]) if d["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_renderer_matches_kubectl_kustomize(name):
    out = subprocess.run(["kubectl", "kustomize", str(VARIANTS[name])], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=key)
    ours = sorted(render(VARIANTS[name]), key=key)
    assert [key(d) for d in ours] == [key(d) for d in theirs]
    assert ours == theirs


# -- cross-references -------------------------------------------------------------------------

def test_namespace_and_images(variant):
    _, docs = variant
    assert ("Namespace", NAMESPACE) in {key(d) for d in docs}
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in docs if d["kind"] != "Namespace")
    images = {c["image"] for _, spec, _ in pods(docs) for c in spec["containers"] + spec.get("initContainers", [])}
    assert images <= {"pearl-serve:latest", "pearl-serve-gateway:latest"}, images


def test_selectors_match_labels(variant):
    _, docs = variant
    workloads = list(pods(docs))
    for w, _, labels in workloads:
        sel = w["spec"].get("selector", {}).get("matchLabels")
        if w["kind"] != "Job":
            assert sel and sel.items() <= labels.items(), f"{key(w)}: selector {sel} vs labels {labels}"
    for d in docs:
        sel = (d["spec"].get("selector", {}).get("matchLabels") if d["kind"] == "PodDisruptionBudget"
               else d["spec"].get("selector") if d["kind"] == "Service" else None)
        if sel is None:
            continue
        hits = [w for w, _, labels in workloads if sel.items() <= labels.items()]
        assert hits, f"{key(d)} selects no pods ({sel})"


def test_probes_are_grpc_on_container_ports(variant):
    _, docs = variant
    for w, c, args in pearl_containers(docs):
        ports = {p["containerPort"] for p in c["ports"]}
        assert args.port in ports, f"{c['name']}: --port {args.port} not among {ports}"
        for probe, service in (("startupProbe", ""), ("readinessProbe", ""), ("livenessProbe", "liveness")):
            p = c.get(probe)
            assert p, f"{key(w)}/{c['name']} has no {probe}"
            assert set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{c['name']} {probe}: not grpc"
            assert isinstance(p["grpc"]["port"], int) and not isinstance(p["grpc"]["port"], bool)
            assert p["grpc"]["port"] == args.port, f"{c['name']} {probe} port {p['grpc']['port']} != --port {args.port}"
            assert p["grpc"].get("service", "") == service
        metrics = args.metrics_port
        assert metrics and metrics in ports, f"{c['name']}: --metrics-port {metrics} not a container port"
        assert args.log_format == "json"


def test_prometheus_annotations(variant):
    _, docs = variant
    for w, spec, _ in pods(docs):
        ann = w["spec"]["template"]["metadata"].get("annotations", {})
        if w["kind"] == "Job":
            continue
        assert ann.get("prometheus.io/scrape") == "true", key(w)
        port = int(ann["prometheus.io/port"])
        metrics = {parse(c["args"]).metrics_port for c in spec["containers"] if c.get("args", [""])[0] in MODULES}
        assert port in metrics, f"{key(w)} scrapes {port}, metrics ports are {metrics}"


def _service_port(docs, host_port: str) -> dict:
    host, _, port = host_port.rpartition(":")
    svc = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host), None)
    assert svc is not None, f"no Service named {host} (dialed as {host_port})"
    assert any(p["port"] == int(port) for p in svc["spec"]["ports"]), f"Service {host} has no port {port}"
    return svc


def test_dialed_names_are_headless_services(variant):
    name, docs = variant
    engines = {c["name"]: (w, c, a) for w, c, a in pearl_containers(docs)}
    gateway = engines["gateway"][2]
    for address in gateway.targets.split(","):
        svc = _service_port(docs, address)
        assert svc["spec"].get("clusterIP") == "None", f"{address}: the gateway needs a headless Service"
        assert svc["spec"]["selector"].items() <= engines["target"][0]["spec"]["template"]["metadata"]["labels"].items()
    target_w, _, target = engines["target"]
    if name == "colocated":
        # one pod: the target dials its own draft on loopback, its pod shares one PID namespace
        assert target.draft == f"127.0.0.1:{engines['draft'][2].port}"
        assert engines["draft"][0] is target_w
        assert target_w["spec"]["template"]["spec"].get("shareProcessNamespace") is True
        assert not any(d["kind"] == "Service" and d["metadata"]["name"] == "pearl-draft" for d in docs)
    else:
        svc = _service_port(docs, target.draft)
        assert svc["spec"].get("clusterIP") == "None"
        assert svc["spec"]["selector"].items() <= engines["draft"][0]["spec"]["template"]["metadata"]["labels"].items()
        assert target.draft.endswith(f":{engines['draft'][2].port}")
    gw_svc = _service_port(docs, f"pearl-gateway:{gateway.port}")
    assert gw_svc["spec"].get("clusterIP") != "None"


def test_grace_periods_exceed_drain_timeout(variant):
    _, docs = variant
    for w, spec, _ in pods(docs):
        if w["kind"] == "Job":
            continue
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace >= DRAIN_S + 10, f"{key(w)}: {grace} s does not outlast the {DRAIN_S} s drain by a margin"


def test_pdbs_cover_every_workload(variant):
    _, docs = variant
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for w, _, labels in pods(docs):
        if w["kind"] == "Job":
            continue
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), key(w)


def test_gpu_resources_and_requests(variant):
    _, docs = variant
    for w, c, args in pearl_containers(docs):
        res = c["resources"]
        assert "cpu" in res["requests"] and "memory" in res["requests"], c["name"]
        assert "cpu" not in res.get("limits", {}), f"{c['name']}: a CPU quota throttles the service's host loop"
        if c["name"] in ("target", "draft"):
            gpus = res["limits"].get("nvidia.com/gpu")
            assert gpus and res["requests"].get("nvidia.com/gpu", gpus) == gpus
            assert args.device.startswith("cuda")
            ranks = len(args.device.partition(":")[2].split(",")) if "," in args.device else args.tp
            assert gpus == ranks, f"{c['name']}: {gpus} GPUs for {ranks} TP ranks"
        else:
            assert "nvidia.com/gpu" not in res.get("limits", {})


def test_security_context(variant):
    _, docs = variant
    for w, spec, _ in pods(docs):
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert not spec.get("hostIPC") and not spec.get("hostPID") and not spec.get("hostNetwork")
        mounted_tmp = True
        for c in spec["containers"] + spec.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert csc["readOnlyRootFilesystem"] is True, c["name"]
            paths = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if c["name"] != "wait-model":
                mounted_tmp &= "/tmp" in paths and "/home/pearl/.cache" in paths
        assert mounted_tmp, f"{key(w)}: a read-only root needs writable /tmp and caches"


def test_model_cache_pvc(variant):
    _, docs = variant
    assert ("PersistentVolumeClaim", "pearl-model-cache") in {key(d) for d in docs}
    writers = 0
    for w, spec, _ in pods(docs):
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["model-cache"]["persistentVolumeClaim"]["claimName"] == "pearl-model-cache"
        for c in spec["containers"]:
            (m,) = [m for m in c["volumeMounts"] if m["name"] == "model-cache"]
            assert m.get("readOnly") is True, f"{c['name']} mounts the model cache writable"
        for c in spec.get("initContainers", []):
            cmd = " ".join(c.get("command", []) + c.get("args", []))
            if "models prepare" in cmd:
                writers += 1
                assert "/cache/.prepared" in cmd
            else:
                assert "/cache/.prepared" in cmd, f"{c['name']}: waits for nothing"
    assert writers >= 1, "nothing fills the model cache (pearl models prepare)"


def test_auth_token_from_secret(variant):
    """Every service (gateway, target, draft) takes the stack's token from the Secret, and no
    manifest carries a token of its own."""
    _, docs = variant
    assert {c["name"] for _, c, _ in pearl_containers(docs)} >= {"gateway", "target", "draft"}
    assert not [d for d in docs if d["kind"] == "Secret"], "a secret baked into a manifest"
    for _, c, _ in pearl_containers(docs):
        (env,) = [e for e in c["env"] if e["name"] == "PEARL_AUTH_TOKEN"]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "pearl-auth" and ref["key"] == "token"
        assert not ref.get("optional"), f"{c['name']}: would start without a token"
        assert {e["name"]: e.get("value") for e in c["env"]}["PEARL_HOST"] == "0.0.0.0"


def test_docs_name_the_secret_and_scaling():
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "kubectl -n pearl-serve create secret generic pearl-auth" in text
    for what in ("pearl-target", "pearl-draft"):
        assert f"scale deploy/{what}" in text
