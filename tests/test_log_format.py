"""No line a service process writes to stderr escapes the JSON format: its own events, the
libraries' loggers, Python warnings, gRPC core, uncaught exceptions in threads and main."""
import json
import subprocess
import sys
import textwrap

import pytest

SERVICE = textwrap.dedent('''
    from pearl_runtime import log
    log.quiet_native_stderr()
    log.setup("target", "info", "json")

    import asyncio, logging, socket, threading, warnings
    import grpc, structlog, torch, transformers

    async def grpc_traffic():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        # a TLS handshake against a plaintext port: gRPC core logs it by default
        tls = grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        plain = grpc.aio.insecure_channel(f"127.0.0.1:{closed}")
        for channel in (tls, plain):
            try:
                await channel.unary_unary("/pearl.v1.Nope/Call")(b"", timeout=1)
            except grpc.aio.AioRpcError:
                pass
            await channel.close()
        await server.stop(None)

    asyncio.run(grpc_traffic())
    warnings.warn("a deprecated thing\\nover two lines")
    (torch.ones(2, requires_grad=True) * 2).grad   # torch's C++ TORCH_WARN, raised as a Python warning
    from tqdm import tqdm
    list(tqdm(range(3)))
    logging.getLogger("some.lib").warning("a library speaks")
    transformers.utils.logging.get_logger("transformers.x").warning("transformers speaks")
    structlog.contextvars.bind_contextvars(request_id="req-42")
    log.get_logger("pearl.test").info("with request", tokens=3)
    structlog.contextvars.unbind_contextvars("request_id")
    worker = threading.Thread(target=lambda: 1 / 0, name="worker")
    worker.start()
    worker.join()
    raise RuntimeError("main dies\\nwith a two-line message")
''')


@pytest.mark.timeout(180)
def test_every_stderr_line_is_one_json_event():
    proc = subprocess.run([sys.executable, "-c", SERVICE], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a stderr line escaped the format: {line!r}\n--- stderr:\n{proc.stderr}")
    for e in events:
        assert {"level", "timestamp", "service", "event"} <= e.keys(), e
        assert e["service"] == "target"
    by_event = {e["event"]: e for e in events}
    assert by_event["with request"]["request_id"] == "req-42"
    assert all("request_id" not in e for e in events if e["event"] != "with request")
    assert by_event["a library speaks"]["logger"] == "some.lib"
    assert "transformers speaks" in by_event
    assert any("a deprecated thing" in e["event"] and e["logger"] == "py.warnings" for e in events)
    assert any("not a leaf Tensor" in e["event"] and e["logger"] == "py.warnings" for e in events)
    thread = by_event["uncaught exception in thread"]
    assert thread["thread_name"] == "worker" and "ZeroDivisionError" in thread["exception"]
    main = by_event["uncaught exception"]
    assert main["level"] == "critical" and "main dies" in main["exception"]
