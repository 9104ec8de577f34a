"""A gateway started beside its target dials before the target listens: within the start-up
grace that is logged once at info ("waiting for target"), not as an outage; after it, or
once the target has been up, an unreachable target is a warning (once per outage)."""
import asyncio
import socket
from types import SimpleNamespace

import structlog

from gateway import connection
from gateway.targets import TargetConnection


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dial_a_dead_target(seconds: float) -> list[dict]:
    async def main():
        conn = TargetConnection(f"127.0.0.1:{_closed_port()}", SimpleNamespace(readiness_changed=lambda conn: None), coalesce_s=0.001,
                                redial_s=(0.02, 0.05), info_timeout_s=1.0)
        conn.start()
        await asyncio.sleep(seconds)
        await conn.close()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(main())
    return [(e["log_level"], e["event"]) for e in logs]


def test_within_the_grace_the_gateway_only_waits():
    events = _dial_a_dead_target(0.5)
    assert events.count(("info", "waiting for target")) == 1
    assert not [e for e in events if e[0] == "warning"], events


def test_after_the_grace_an_unreachable_target_is_one_warning(monkeypatch):
    monkeypatch.setattr(connection, "STARTUP_GRACE_S", 0.0)
    events = _dial_a_dead_target(0.5)
    assert events.count(("warning", "target unreachable")) == 1, events
    assert ("debug", "target unreachable") in events        # the re-dials that followed
