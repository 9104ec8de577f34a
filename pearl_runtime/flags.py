"""Flags all three services share, and the hand-off of flags to variables read deep down.

Torch-free, so the gateway's parser can use it.
"""
import argparse

from pearl_runtime import envs


def add_operating_args(p: argparse.ArgumentParser) -> None:
    """Logging, metrics, health and the collector: the flags all three services share."""
    p.add_argument("--log-level", default=envs.default("PEARL_LOG_LEVEL"))
    p.add_argument("--log-format", choices=("json", "console", "auto"), default=envs.default("PEARL_LOG_FORMAT"),
                   help="json (one object a line), console, or auto: console on a terminal, else json")
    p.add_argument("--metrics-port", type=int, default=envs.default("PEARL_METRICS_PORT"),
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: off)")
    p.add_argument("--health-port", type=int, default=envs.default("PEARL_HEALTH_PORT"),
                   help="also serve grpc.health.v1 alone, in plaintext, on this port: for probes when TLS is on (0: off)")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false", default=envs.default("PEARL_GC_FREEZE"),
                   help="leave the garbage collector as Python sets it (default: the start-up heap frozen out of it)")


def export_flags(args, names: dict[str, str]) -> None:
    """Hand flags on to the code that reads their variables deep down and to the TP ranks:
    `names` maps a variable to its flag's dest."""
    for name, dest in names.items():
        envs.export(name, getattr(args, dest))
