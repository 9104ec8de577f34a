"""compose.yaml stays in step with the CLI: every service's command parses, and the wiring
between services (ports, the draft and target addresses) is consistent; every long-running
service has a `pearl health` healthcheck, waits where waiting is right, stops within a grace
period longer than the drain timeout; GPUs and TP come from the environment; the one-gpu
profile runs draft and target under an MPS daemon. (`docker compose config` is not installed
here: the file is parsed and interpolated by hand.)"""
import importlib
import re
from pathlib import Path

import pytest
import yaml

from pearl_runtime.launch import MODULES

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "compose.yaml").read_text()
DRAIN_S = 30.0   # the drain a stopping service may take: the grace periods must outlast it
_VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")
TOKEN = "a-token-from-the-environment"


class Unset(Exception):
    """A ${VAR:?message} whose VAR is unset: compose refuses the file with the message."""


def _value(m, env: dict[str, str]) -> str:
    name, kind, rest = m.groups()
    if env.get(name):
        return env[name]
    if kind == "?":
        raise Unset(f"{name}: {rest.replace('$$', '$')}")
    return rest or ""


def interpolate(value, env: dict[str, str]):
    """compose's ${VAR} / ${VAR:-default} / ${VAR:?error} over every string of the file."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: _value(m, env), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose(**env: str) -> dict:
    """The file as compose reads it, with a token in the environment unless `env` unsets it."""
    return interpolate(yaml.safe_load(TEXT), {"PEARL_AUTH_TOKEN": TOKEN, **env})


COMPOSE = compose()
SERVICES = COMPOSE["services"]
# services that run a pearl subcommand (the image's entrypoint); ns and mps override it
PEARL = sorted(n for n, s in SERVICES.items() if "entrypoint" not in s)
LONG_RUNNING = sorted(n for n in PEARL if SERVICES[n].get("restart") != "no")


def parse(command: list[str]):
    """A compose command (`draft --port ...`) through the service's own parser."""
    if command[0] not in MODULES:   # a `pearl` verb (models prepare)
        from pearl_runtime.cli import build_parser
        return build_parser().parse_args(command)
    args = importlib.import_module(f"{MODULES[command[0]]}.__main__").build_parser().parse_args(command[1:])
    args.cmd = command[0]
    return args


def seconds(text: str) -> float:
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


@pytest.mark.parametrize("name", PEARL)
def test_command_parses(name):
    args = parse(SERVICES[name]["command"])
    assert args.cmd == SERVICES[name]["command"][0]


def test_wiring():
    draft, target, gateway = (parse(SERVICES[n]["command"]) for n in ("draft", "target", "gateway"))
    assert target.draft == f"draft:{draft.port}"
    assert gateway.targets == f"target:{target.port}"    # one DNS name: `--scale target=N` works
    assert SERVICES["gateway"]["ports"][0].endswith(f":{gateway.port}")
    assert all(SERVICES[n]["environment"]["PEARL_HOST"] == "0.0.0.0" for n in ("draft", "target", "gateway"))
    assert target.served_model_name and target.served_model_name == gateway.served_model_name
    for n in ("draft", "target", "gateway"):
        args = parse(SERVICES[n]["command"])
        assert args.metrics_port and args.log_format == "json", n
        assert SERVICES[n]["environment"]["PEARL_LOG_FORMAT"] == "json"
    assert len({parse(SERVICES[n]["command"]).metrics_port for n in ("draft", "target", "gateway")}) == 3
    # only the gateway is published, and on loopback
    assert all(not SERVICES[n].get("ports") for n in SERVICES if n != "gateway")
    assert all(p.startswith("127.0.0.1:") for p in SERVICES["gateway"]["ports"])


def test_expected_services():
    assert {"prepare", "draft", "target", "gateway", "mps", "ns"} <= set(SERVICES)
    assert LONG_RUNNING == ["draft", "gateway", "target"]


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_healthcheck_is_pearl_health_on_the_service_port(name):
    s = SERVICES[name]
    hc = s["healthcheck"]
    assert not hc.get("disable")
    test = hc["test"]
    assert test[0] == "CMD" and test[1:3] == ["pearl", "health"], test
    port = parse(s["command"]).port
    assert test[3] == f"127.0.0.1:{port}"
    assert seconds(hc["timeout"]) > float(test[test.index("--timeout") + 1])   # pearl health answers first
    assert seconds(hc["start_period"]) >= 60


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_stop_grace_and_init(name):
    s = SERVICES[name]
    assert seconds(s["stop_grace_period"]) >= DRAIN_S + 10, "SIGKILL would race the drain"
    assert s["init"] is True
    assert s["restart"] == "unless-stopped"


def test_depends_on():
    dep = {n: SERVICES[n].get("depends_on", {}) for n in SERVICES}
    for n in ("draft", "target", "gateway"):
        assert dep[n]["prepare"]["condition"] == "service_completed_successfully"
    # the gateway is SERVING only while a target is
    assert dep["gateway"]["target"]["condition"] == "service_healthy"
    # a target serves ar until its draft is up: it need not wait for the draft's health
    assert dep["target"]["draft"]["condition"] == "service_started"
    for n in ("draft", "target"):
        assert dep[n]["mps"] == {"condition": "service_healthy", "required": False}
    assert SERVICES["mps"]["healthcheck"]["test"][0] == "CMD-SHELL"


def test_model_mounts_read_only_except_prepare():
    for n in PEARL:
        cache = [v for v in SERVICES[n]["volumes"] if v.startswith("pearl-cache:")]
        assert len(cache) == 1, n
        assert cache[0].endswith(":ro") == (n != "prepare"), n
        assert all(v.endswith(":ro") for v in SERVICES[n]["volumes"] if v.startswith("./models"))
    assert parse(SERVICES["prepare"]["command"]).action == "prepare"


def test_gpus_and_tp_from_the_environment():
    for n, var, default in (("target", "PEARL_TARGET_GPUS", "0"), ("draft", "PEARL_DRAFT_GPUS", "1")):
        raw = yaml.safe_load(TEXT)["services"][n]["environment"]["PEARL_DEVICE"]
        assert f"${{{var}:-" in raw
        assert SERVICES[n]["environment"]["PEARL_DEVICE"] == f"cuda:{default}"   # a 2-GPU node
        devices = SERVICES[n]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        assert "--device" not in SERVICES[n]["command"]      # the env var decides
    assert "${PEARL_TP:-" in yaml.safe_load(TEXT)["services"]["target"]["environment"]["PEARL_TP"]
    tp2 = compose(PEARL_TARGET_GPUS="0,1", PEARL_TP="2", PEARL_DRAFT_GPUS="2")["services"]
    assert tp2["target"]["environment"]["PEARL_DEVICE"] == "cuda:0,1"
    assert tp2["target"]["environment"]["PEARL_TP"] == "2"
    from pearl_runtime.config import EngineConfig
    cfg = EngineConfig(model="m", device=tp2["target"]["environment"]["PEARL_DEVICE"],
                       tp_size=int(tp2["target"]["environment"]["PEARL_TP"]))
    assert cfg.devices == [0, 1] and cfg.tp_size == 2
    assert "gpu" not in str(SERVICES["gateway"].get("deploy", ""))


def test_cuda_ipc_namespaces_and_shm():
    ns = SERVICES["ns"]
    assert ns["ipc"] == "shareable" and ns["entrypoint"][0] == "sleep"
    assert re.fullmatch(r"\d+[gm]b", ns["shm_size"])   # /dev/shm is the owner's: NCCL and MPS use it
    assert ns["restart"] == "unless-stopped"
    for n in ("draft", "target", "mps"):
        assert SERVICES[n]["ipc"] == "service:ns" and SERVICES[n]["pid"] == "service:ns", n


def test_one_gpu_profile():
    mps = SERVICES["mps"]
    assert mps["profiles"] == ["one-gpu"]
    assert "nvidia-cuda-mps-control -f" in " ".join(mps["entrypoint"])
    pipe = mps["environment"]["CUDA_MPS_PIPE_DIRECTORY"]
    assert all(not s.get("profiles") for n, s in SERVICES.items() if n != "mps")
    for n in ("draft", "target"):
        env = SERVICES[n]["environment"]
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == pipe
        assert 0 < int(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]) <= 100
        assert {v.split(":")[0] for v in SERVICES[n]["volumes"]} >= {"mps"}
    assert "mps:/mps" in mps["volumes"]
    # the documented one-GPU command puts both on GPU 0
    assert "PEARL_DRAFT_GPUS=0 docker compose --profile one-gpu up" in TEXT
    one = compose(PEARL_DRAFT_GPUS="0")["services"]
    assert one["draft"]["environment"]["PEARL_DEVICE"] == one["target"]["environment"]["PEARL_DEVICE"] == "cuda:0"


def test_images_and_builds():
    assert SERVICES["gateway"]["build"]["target"] == "gateway"
    for n in ("draft", "target", "prepare", "mps", "ns"):
        assert SERVICES[n]["build"]["target"] == "gpu", n
        assert SERVICES[n]["image"] == SERVICES["target"]["image"]


def test_every_service_gets_the_token_from_the_environment():
    """The secret comes from the host's environment or .env (compose reads both), never the
    file: every pearl service gets it, and without it compose refuses to start anything."""
    for name in ("draft", "target", "gateway"):
        assert SERVICES[name]["environment"]["PEARL_AUTH_TOKEN"] == TOKEN, name
    assert TOKEN not in TEXT
    with pytest.raises(Unset, match="PEARL_AUTH_TOKEN.*openssl rand"):
        compose(PEARL_AUTH_TOKEN="")
    readme = (ROOT / "README.md").read_text()
    assert "PEARL_AUTH_TOKEN=$(openssl rand -hex 32) > .env" in readme
