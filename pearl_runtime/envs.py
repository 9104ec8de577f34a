"""Every PEARL_* environment variable: declared once with its type, default and doc.

This module is the only reader of os.environ for PEARL_* names (a test enforces it). Values
are read when asked for, so a test or a launcher may set them after import. Each variable is
either the default of one flag (`flag`: the flag's default is `default(name)`, so setting the
variable is the same as passing the flag) or set by the stack around the process (`role`:
compose, the image, Kubernetes). docs/config.md is generated from this table and the argparse
parsers (scripts/gen_docs.py); tests check both directions.
"""
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Var:
    name: str
    type: type          # str, int, float or bool
    default: Any
    doc: str
    used_by: tuple[str, ...]   # the `pearl` subcommands (or, for a role, the files) that read it
    flag: str | None = None    # the flag whose default it is, in each of `used_by`
    role: str | None = None    # without a flag: who sets it and what for

    def parse(self, text: str) -> Any:
        if self.type is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"{self.name} wants a boolean (1/0, true/false, on/off), got {text!r}")
        try:
            return self.type(text)
        except ValueError:
            raise ValueError(f"{self.name} wants {self.type.__name__}, got {text!r}") from None


SERVICES = ("draft", "target", "gateway")
ENGINES = ("draft", "target")

_VARS: dict[str, Var] = {}


def _declare(name: str, type_: type, default: Any, doc: str, used_by: tuple[str, ...],
             flag: str | None = None, role: str | None = None) -> None:
    assert (flag is None) != (role is None), f"{name}: a flag or a role, one of them"
    _VARS[name] = Var(name, type_, default, doc, used_by, flag, role)


# -- where and what ---------------------------------------------------------------------------
_declare("PEARL_MODEL", str, None, "HF model directory (default: the embedded SmolLM2-135M-Instruct)",
         SERVICES + ("up",), "--model")
_declare("PEARL_DRAFT_MODEL", str, None, "the draft's model directory (default: derived from the target's)",
         ("up",), "--draft-model")
_declare("PEARL_SERVED_MODEL_NAME", str, None,
         "the model name clients see and may ask for (default: the model directory's name)", ("target", "gateway"),
         "--served-model-name")
_declare("PEARL_HOST", str, "127.0.0.1", "address the service binds (loopback unless told otherwise)", SERVICES,
         "--host")
_declare("PEARL_DRAFT_PORT", int, 50052, "the draft's gRPC port", ("draft",), "--port")
_declare("PEARL_TARGET_PORT", int, 50051, "the target's gRPC port", ("target",), "--port")
_declare("PEARL_GATEWAY_PORT", int, 50050, "the gateway's gRPC port", ("gateway",), "--port")
_declare("PEARL_HTTP_PORT", int, 0,
         "the gateway's OpenAI-compatible HTTP port (/v1/completions, /v1/chat/completions, /health, /metrics; 0: off)",
         ("gateway",), "--http-port")
_declare("PEARL_DRAFT_ADDRESS", str, "127.0.0.1:50052", "the draft service the target dials", ("target",), "--draft")
_declare("PEARL_TARGETS", str, "127.0.0.1:50051", "comma-separated target addresses the gateway routes over",
         ("gateway",), "--targets")
_declare("PEARL_RESOLVE_INTERVAL_S", float, 5.0,
         "how often the gateway re-resolves each --targets name (replicas behind one DNS name)", ("gateway",),
         "--resolve-interval")
_declare("PEARL_GATEWAY", str, "127.0.0.1:50050", "the gateway `pearl generate` asks", ("generate",), "--address")
_declare("PEARL_CACHE_DIR", str, None, "where prepared models live (default ~/.cache/pearl-serve)",
         ("models", "up", "bench") + SERVICES,
         role="the model volume's mount point: compose and Kubernetes set it (/cache) for `pearl models "
              "prepare` and every service")

# -- the engine -----------------------------------------------------------------------------
_declare("PEARL_DEVICE", str, "cpu", "cpu, cuda, cuda:N or cuda:0,1,... (one GPU per TP rank)", ENGINES, "--device")
_declare("PEARL_TP", int, 1, "tensor-parallel ranks of the service", ENGINES, "--tp")
_declare("PEARL_DTYPE", str, None, "float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)", ENGINES, "--dtype")
_declare("PEARL_BLOCK_SIZE", int, 16, "tokens per KV cache block", ENGINES, "--block-size")
_declare("PEARL_KV_CACHE_GB", float, 1.0, "KV cache size per rank in GiB", ENGINES, "--kv-cache-gb")
_declare("PEARL_MAX_NUM_SEQS", int, 64, "sequences one engine step may hold", ENGINES, "--max-num-seqs")
_declare("PEARL_MAX_MODEL_LEN", int, 0, "longest sequence, prompt included (0: the model's limit)", ENGINES,
         "--max-model-len")
_declare("PEARL_ATTENTION", str, "auto", "auto | reference | triton | flash-attn: the attention kernels", ENGINES,
         "--attention")
_declare("PEARL_PREFIX_CACHE", bool, True, "reuse cached KV blocks of shared prompt prefixes (0: recompute)",
         ENGINES, "--no-prefix-cache")
_declare("PEARL_SKINNY_LINEARS", str, "auto", "auto | triton | reference | off: fused one-token linears", ENGINES,
         "--skinny-linears")
_declare("PEARL_THREADS", int, 1, "CPU threads for torch", ENGINES, "--threads")
_declare("PEARL_KEEP_AWAKE", str, "auto",
         "auto | on | off: idle busy loops so no core halts (auto: on a GPU without a CPU quota); "
         "`pearl bench` records it", ENGINES, "--keep-awake")
_declare("PEARL_FP8_WEIGHTS", str, "auto", "auto | on | off: fp8 copies of the draft's linears", ("draft",),
         "--fp8-weights")
_declare("PEARL_TP_TIMEOUT_S", float, None, "how long a TP collective may wait (default: torch's)", ENGINES,
         "--tp-timeout")
_declare("PEARL_SKINNY_ROWS", int, None, "1 | 2: force the row count the skinny kernels take", ENGINES,
         "--skinny-rows")
_declare("PEARL_PDL", bool, True, "programmatic dependent launch on Hopper (0 turns it off)", ENGINES, "--no-pdl")
_declare("PEARL_GC_FREEZE", bool, True, "freeze the start-up heap out of the collector (0: leave gc as is)",
         SERVICES, "--no-gc-freeze")

# -- speculation ----------------------------------------------------------------------------
_declare("PEARL_MODE", str, "auto", "auto (per batch size, the fastest of ar, sd and pearl by measured speeds) | "
         "pearl | sd | ar", ("target", "up"), "--mode")
_declare("PEARL_GAMMA", str, "auto", "draft tokens per round, or auto", ("target", "up"), "--gamma")
_declare("PEARL_MAX_GAMMA", int, 16, "ceiling of auto gamma", ("target",), "--max-gamma")
_declare("PEARL_HEAD_START", str, "auto", "pearl: draft tokens waited for in pre-verify (auto: gamma // 2)",
         ("target",), "--head-start")
_declare("PEARL_HEAD_START_QUORUM", float, 0.75, "pearl: share of a batch in pre-verify that earns a head start",
         ("target",), "--head-start-quorum")
_declare("PEARL_AR_STEPS", int, 4, "ar: greedy steps chained on the device a round", ("target",), "--ar-steps")
_declare("PEARL_DEVICE_TOKENS", str, "on", "sd: draft tokens through a shared device buffer (on | off)",
         ("target",), "--device-tokens")
_declare("PEARL_ROUND_DATAGRAMS", str, "on", "also send each Round as a UDP datagram (on | off)", ("target",),
         "--round-datagrams")

# -- operating ------------------------------------------------------------------------------
_declare("PEARL_LOG_LEVEL", str, "info", "debug | info | warning | error (`pearl up`: warning)",
         SERVICES + ("up",), "--log-level")
_declare("PEARL_LOG_FORMAT", str, "auto", "json | console | auto (console on a terminal, else json)",
         SERVICES, "--log-format")
_declare("PEARL_METRICS_PORT", int, 0, "HTTP port of /metrics (0: off)", SERVICES, "--metrics-port")
_declare("PEARL_HEALTH_PORT", int, 0, "a plaintext port serving only grpc.health.v1, for probes under TLS (0: off)",
         SERVICES, "--health-port")
_declare("PEARL_DRAIN_TIMEOUT_S", float, 30.0,
         "SIGTERM: how long the requests in flight may take to finish before the port closes", ("target", "gateway"),
         "--drain-timeout")
_declare("PEARL_HUNG_ROUND_FLOOR_S", float, 30.0,
         "the least time a round runs before the watchdog calls it hung (else 100x the mean round)", ("target",),
         "--hung-round-floor")
_declare("PEARL_MAX_QUEUED_REQUESTS", int, 1024,
         "requests a target holds waiting for a batch slot; past it RESOURCE_EXHAUSTED", ("target",),
         "--max-queued-requests")
_declare("PEARL_MAX_PREFILL_TOKENS", str, "auto",
         "prompt tokens one target step admits (whole sequences, one at least): auto (8192 on a GPU, 256 on CPU), "
         "N, or 0 for no limit", ("target",), "--max-prefill-tokens")
_declare("PEARL_MAX_CONCURRENT_REQUESTS", int, 1024,
         "Generate calls the gateway serves at once; past it RESOURCE_EXHAUSTED", ("gateway",),
         "--max-concurrent-requests")
_declare("PEARL_COALESCE_MS", float, 2.0, "how long the gateway gathers new requests into one Submit",
         ("gateway",), "--coalesce-ms")

# -- security -------------------------------------------------------------------------------
_declare("PEARL_AUTH_TOKEN", str, None,
         "the stack's shared secret: servers require `authorization: Bearer <token>`, clients present it",
         SERVICES + ("generate",), "--auth-token")
_declare("PEARL_TLS_CERT", str, None, "PEM certificate: serve over TLS", SERVICES, "--tls-cert")
_declare("PEARL_TLS_KEY", str, None, "PEM private key of the certificate", SERVICES, "--tls-key")
_declare("PEARL_TLS_CLIENT_CA", str, None, "PEM CA a caller's certificate must be signed by (mTLS)", SERVICES,
         "--tls-client-ca")
_declare("PEARL_TLS_CA", str, None, "PEM certificate to trust as a client (connect over TLS)",
         ("generate", "health"), "--tls-ca")
_declare("PEARL_TLS_SERVER_NAME", str, None, "name the server certificate is issued for", ("generate",),
         "--tls-server-name")
_declare("PEARL_TARGET_TLS_CA", str, None, "PEM CA the gateway trusts for its targets (dial them over TLS)",
         ("gateway",), "--target-tls-ca")
_declare("PEARL_TARGET_TLS_CERT", str, None, "the gateway's client certificate for targets that require one",
         ("gateway",), "--target-tls-cert")
_declare("PEARL_TARGET_TLS_KEY", str, None, "private key of --target-tls-cert", ("gateway",), "--target-tls-key")
_declare("PEARL_TARGET_AUTH_TOKEN", str, None, "the token the gateway presents to targets (default: --auth-token)",
         ("gateway",), "--target-auth-token")
_declare("PEARL_DRAFT_TLS_CA", str, None, "PEM CA the target trusts for its draft (dial it over TLS)",
         ("target",), "--draft-tls-ca")
_declare("PEARL_DRAFT_TLS_CERT", str, None, "the target's client certificate for a draft that requires one",
         ("target",), "--draft-tls-cert")
_declare("PEARL_DRAFT_TLS_KEY", str, None, "private key of --draft-tls-cert", ("target",), "--draft-tls-key")
_declare("PEARL_DRAFT_AUTH_TOKEN", str, None, "the token the target presents to its draft (default: --auth-token)",
         ("target",), "--draft-auth-token")

# -- measurement (benchmarks and probes) ----------------------------------------------------
_declare("PEARL_PROFILE_ROUNDS", int, 0, "profile N rounds after a warm-up (torch profiler)", ("draft",),
         "--profile-rounds")
_declare("PEARL_ROUND_TIMES", int, 0, "log the round phases every N rounds (0: off)", ("draft",), "--round-times")
_declare("PEARL_GIT_COMMIT", str, None, "the commit a benchmark records where the tree has no .git", ("bench",),
         "--git-commit")

# -- the stack around the processes (compose, the image); no process reads these -------------
_declare("PEARL_TARGET_GPUS", str, "0", "the target's GPUs, one per TP rank, comma-separated", ("compose.yaml",),
         role="compose: the target container's GPU reservation and --device")
_declare("PEARL_DRAFT_GPUS", str, "1", "the draft's GPU", ("compose.yaml",),
         role="compose: the draft container's GPU reservation and --device (0 with the one-gpu profile)")
_declare("PEARL_IMAGE", str, "pearl-serve:latest", "the GPU image of draft, target and prepare", ("compose.yaml",),
         role="compose: the image the GPU services run")
_declare("PEARL_GATEWAY_IMAGE", str, "pearl-serve-gateway:latest", "the CPU-only gateway image", ("compose.yaml",),
         role="compose: the image the gateway runs")
_declare("PEARL_HEALTH_ADDRESS", str, "127.0.0.1:50050", "the address the image's HEALTHCHECK asks",
         ("Dockerfile",), role="the image: `pearl health $PEARL_HEALTH_ADDRESS` is its HEALTHCHECK; compose sets it "
                               "per service (the health port under TLS)")
_declare("PEARL_UID", int, 10001, "uid and gid of the image's non-root user `pearl`", ("Dockerfile",),
         role="a Dockerfile build argument (docker build --build-arg PEARL_UID=...)")


def registry() -> dict[str, Var]:
    return dict(_VARS)


def var(name: str) -> Var:
    try:
        return _VARS[name]
    except KeyError:
        raise KeyError(f"{name} is not declared in pearl_runtime/envs.py") from None


def get(name: str) -> Any:
    """The variable's value, parsed, or its default when unset."""
    v = var(name)
    text = os.environ.get(name)
    return v.default if text is None else v.parse(text)


def default(name: str, fallback: Any = None) -> Any:
    """A flag's default: the variable's value (`fallback`, when given, replaces the declared
    default for one command). An unparsable value is a usage error (exit 2)."""
    try:
        value = get(name)
        return fallback if fallback is not None and os.environ.get(name) is None else value
    except ValueError as e:
        import sys
        print(f"pearl: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def export(name: str, value: Any) -> None:
    """Hand a flag's value on to the code that reads its variable deep down (kernels, the
    collector) and to the processes the service starts (TP ranks)."""
    var(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
