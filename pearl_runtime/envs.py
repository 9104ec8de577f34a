"""Every PEARL_* environment variable: declared once with its type, default and doc.

This module is the only reader of os.environ for PEARL_* names (a test enforces it). Values
are read when asked for, so a test or a launcher may set them after import. Flags take their
defaults from here (`default("PEARL_PORT")`), which is how every flag gets its variable;
docs/config.md is generated from this table and the argparse parsers (scripts/gen_docs.py).
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
    used_by: tuple[str, ...]   # the subcommands (or roles) that read it

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


def _declare(name: str, type_: type, default: Any, doc: str, used_by: tuple[str, ...]) -> None:
    _VARS[name] = Var(name, type_, default, doc, used_by)


# -- where and what ---------------------------------------------------------------------------
_declare("PEARL_MODEL", str, None, "HF model directory (default: the embedded SmolLM2-135M-Instruct)",
         SERVICES + ("up", "bench"))
_declare("PEARL_DRAFT_MODEL", str, None, "the draft's model directory for `pearl up`", ("up",))
_declare("PEARL_SERVED_MODEL_NAME", str, None,
         "the model name clients see and may ask for (default: the model directory's name)", ("target", "gateway"))
_declare("PEARL_HOST", str, "127.0.0.1", "address the service binds (loopback unless told otherwise)", SERVICES)
_declare("PEARL_DRAFT_PORT", int, 50052, "the draft's gRPC port", ("draft",))
_declare("PEARL_TARGET_PORT", int, 50051, "the target's gRPC port", ("target",))
_declare("PEARL_GATEWAY_PORT", int, 50050, "the gateway's gRPC port", ("gateway",))
_declare("PEARL_DRAFT_ADDRESS", str, "127.0.0.1:50052", "the draft service the target dials", ("target",))
_declare("PEARL_TARGETS", str, "127.0.0.1:50051", "comma-separated target addresses the gateway routes over",
         ("gateway",))
_declare("PEARL_RESOLVE_INTERVAL_S", float, 5.0,
         "how often the gateway re-resolves each --targets name (replicas behind one DNS name)", ("gateway",))
_declare("PEARL_GATEWAY", str, "127.0.0.1:50050", "the gateway address of `pearl generate`", ("generate",))
_declare("PEARL_CACHE_DIR", str, None, "where prepared models live (default ~/.cache/pearl-serve)",
         ("models", "up", "bench") + SERVICES)

# -- the engine -----------------------------------------------------------------------------
_declare("PEARL_DEVICE", str, "cpu", "cpu, cuda, cuda:N or cuda:0,1,... (one GPU per TP rank)", ENGINES)
_declare("PEARL_TP", int, 1, "tensor-parallel ranks of the service", ENGINES)
_declare("PEARL_DTYPE", str, None, "float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)", ENGINES)
_declare("PEARL_KV_CACHE_GB", float, 1.0, "KV cache size per rank in GiB", ENGINES)
_declare("PEARL_SKINNY_LINEARS", str, "auto", "auto | triton | reference | off: fused one-token linears", ENGINES)
_declare("PEARL_THREADS", int, 1, "CPU threads for torch", ENGINES)
_declare("PEARL_KEEP_AWAKE", str, "auto", "auto | on | off: idle busy loops so no core halts", ENGINES + ("bench",))
_declare("PEARL_FP8_WEIGHTS", str, "auto", "auto | on | off: fp8 copies of the draft's linears", ("draft",))
_declare("PEARL_TP_TIMEOUT_S", float, None, "how long a TP collective may wait (default: torch's)", ENGINES)
_declare("PEARL_SKINNY_ROWS", int, None, "1 | 2: force the row count the skinny kernels take", ENGINES)
_declare("PEARL_PDL", bool, True, "programmatic dependent launch on Hopper (0 turns it off)", ENGINES)
_declare("PEARL_GC_FREEZE", bool, True, "freeze the start-up heap out of the collector (0: leave gc as is)",
         SERVICES)

# -- speculation ----------------------------------------------------------------------------
_declare("PEARL_MODE", str, "pearl", "pearl | sd | ar", ("target",))
_declare("PEARL_GAMMA", str, "auto", "draft tokens per round, or auto", ("target", "up"))
_declare("PEARL_MAX_GAMMA", int, 16, "ceiling of auto gamma", ("target",))
_declare("PEARL_HEAD_START", str, "auto", "pearl: draft tokens waited for in pre-verify (auto: gamma // 2)",
         ("target",))
_declare("PEARL_HEAD_START_QUORUM", float, 0.75, "pearl: share of a batch in pre-verify that earns a head start",
         ("target",))
_declare("PEARL_AR_STEPS", int, 4, "ar: greedy steps chained on the device a round", ("target",))
_declare("PEARL_DEVICE_TOKENS", str, "on", "sd: draft tokens through a shared device buffer (on | off)",
         ("target",))
_declare("PEARL_ROUND_DATAGRAMS", str, "on", "also send each Round as a UDP datagram (on | off)", ("target",))

# -- operating ------------------------------------------------------------------------------
_declare("PEARL_LOG_LEVEL", str, "info", "debug | info | warning | error", SERVICES + ("up", "bench"))
_declare("PEARL_LOG_FORMAT", str, "auto", "json | console | auto (console on a terminal, else json)",
         SERVICES + ("up",))
_declare("PEARL_METRICS_PORT", int, 0, "HTTP port of /metrics (0: off)", SERVICES)
_declare("PEARL_HEALTH_PORT", int, 0, "a plaintext port serving only grpc.health.v1 (0: off)", SERVICES)
_declare("PEARL_HTTP_PORT", int, 0, "the gateway's OpenAI-compatible HTTP port (0: off)", ("gateway",))
_declare("PEARL_DRAIN_TIMEOUT_S", float, 30.0, "how long SIGTERM lets in-flight requests finish", SERVICES)
_declare("PEARL_COALESCE_MS", float, 2.0, "how long the gateway gathers new requests into one Submit",
         ("gateway",))
_declare("PEARL_MAX_QUEUED_REQUESTS", int, 1024, "bound of the waiting queue (past it: RESOURCE_EXHAUSTED)",
         ("target", "gateway"))
_declare("PEARL_MAX_CONCURRENT_REQUESTS", int, 4096, "the gateway's bound on requests in flight", ("gateway",))

# -- security -------------------------------------------------------------------------------
_declare("PEARL_AUTH_TOKEN", str, None,
         "the stack's shared secret: servers require `authorization: Bearer <token>`, clients present it",
         SERVICES + ("generate", "health"))
_declare("PEARL_TLS_CERT", str, None, "PEM certificate: serve over TLS", SERVICES)
_declare("PEARL_TLS_KEY", str, None, "PEM private key of the certificate", SERVICES)
_declare("PEARL_TLS_CA", str, None, "PEM certificate to trust as a client (connect over TLS)",
         ("generate", "health"))
_declare("PEARL_TLS_SERVER_NAME", str, None, "name the server certificate is issued for", ("generate", "health"))

# -- measurement (benchmarks and probes) ----------------------------------------------------
_declare("PEARL_PROFILE_ROUNDS", int, 0, "draft: profile N rounds after a warm-up (torch profiler)", ("draft",))
_declare("PEARL_ROUND_TIMES", int, 0, "draft: log its round phases every N rounds", ("draft",))
_declare("PEARL_GIT_COMMIT", str, None, "the commit a benchmark records where the tree has no .git", ("bench",))


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


def default(name: str) -> Any:
    """A flag's default: the variable's value. An unparsable value is a usage error (exit 2)."""
    try:
        return get(name)
    except ValueError as e:
        import sys
        print(f"pearl: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
