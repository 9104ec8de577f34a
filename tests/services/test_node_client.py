"""pearl.v1 from an independent gRPC implementation: Node's @grpc/grpc-js, the .proto files
loaded at run time by @grpc/proto-loader (no generated code), against a real running gateway.

tests/node/generate.mjs makes one Generate call and prints what it got as JSON; the same
greedy request through pearl_runtime.client.generate must give the same token ids and text.
The npm packages are pinned in tests/node/package.json + package-lock.json and installed
(`npm ci`) into tests/node/node_modules when missing there, so later runs reuse them.
Skipped only where node or npm is absent; a failed install fails the test (CI has the registry).
"""
import json
import shutil
import subprocess

import grpc
import pytest

from pearl_runtime.client import generate
from tests.services.procs import ROOT, run

NODE_DIR = ROOT / "tests" / "node"
PROTO_DIR = ROOT / "proto"
SCRIPT = NODE_DIR / "generate.mjs"
PROMPT = "Once upon a time there was a little robot named Pixel."
CHAT = [("system", "You are terse."), ("user", "Name three colours.")]
MAX_TOKENS = 24

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="needs Node.js (node and npm on PATH) for the @grpc/grpc-js client")


def installed(pins: dict[str, str]) -> bool:
    """Every pinned package is in tests/node/node_modules at its pinned version."""
    for name, version in pins.items():
        manifest = NODE_DIR / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("version") != version:
            return False
    return True


@pytest.fixture(scope="module")
def node_client():
    """tests/node/node_modules with the pinned @grpc/grpc-js and @grpc/proto-loader (npm ci once)."""
    pins = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if not installed(pins):
        # --ignore-scripts: protobufjs's postinstall is only a version notice
        cmd = ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"]
        try:
            done = subprocess.run(cmd, cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` in {NODE_DIR} took over 300 s: is the npm registry reachable?")
        if done.returncode != 0 or not installed(pins):
            pytest.fail(f"`{' '.join(cmd)}` in {NODE_DIR} failed (rc {done.returncode}); the test needs the npm "
                        f"registry (or a filled node_modules) for {pins}. npm said:\n"
                        f"{(done.stderr or done.stdout)[-3000:]}")
    return NODE_DIR


def node_generate(address: str, request: dict) -> dict:
    """One Generate call from Node: {metadata, deltas: [{text, token_ids}], final, error}."""
    done = subprocess.run(["node", str(SCRIPT), str(PROTO_DIR), address, json.dumps(request)],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"node exited {done.returncode}:\n{done.stderr[-3000:]}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line from node, got:\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def stack(cluster):
    return cluster.stack("copy", "pearl")


def python_generate(address: str, **kw):
    """pearl_runtime.client.generate, also returning its deltas as (text, token_ids)."""
    deltas = []
    done = run(generate(address, on_delta=lambda text, ids: deltas.append((text, ids)), timeout_s=60, **kw))
    return done, deltas


@pytest.mark.parametrize("prompt", ["text", "chat"])
def test_node_stream_equals_the_python_client(node_client, stack, prompt):
    address = stack.gateway.address
    params = {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    if prompt == "text":
        node_req, py_kw = {"text": PROMPT}, {"prompt": PROMPT}
    else:
        node_req = {"chat": {"messages": [{"role": r, "content": c} for r, c in CHAT]}}
        py_kw = {"chat": CHAT}
    got = node_generate(address, {**node_req, "params": params})
    assert got["error"] is None, got["error"]
    want, want_deltas = python_generate(address, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **py_kw)

    node_ids = [t for d in got["deltas"] for t in d["token_ids"]]
    node_text = "".join(d["text"] for d in got["deltas"])
    assert len(want.token_ids) == MAX_TOKENS      # ignore_eos: a full-length, deterministic completion
    assert node_ids == want.token_ids
    assert node_text == want.text == "".join(t for t, _ in want_deltas)
    assert got["deltas"] and all(d["token_ids"] for d in got["deltas"])   # it streamed, in pieces with ids
    final = got["final"]
    assert final is not None and final["text"] == want.text
    assert final["finish_reason"] == "FINISH_REASON_LENGTH" and want.finish_reason == "length"
    assert final["stats"]["new_tokens"] == MAX_TOKENS and final["stats"]["prompt_tokens"] == want.stats.prompt_tokens
    # the id in the headers is the one in the messages
    assert got["metadata"].get("x-request-id") == final["request_id"] != ""


def test_node_sees_invalid_argument_naming_the_field_and_the_request_id(node_client, stack):
    address = stack.gateway.address
    got = node_generate(address, {"request_id": "node-bad-1", "text": PROMPT, "params": {"max_tokens": 0}})
    err = got["error"]
    assert err is not None and err["code_name"] == "INVALID_ARGUMENT", got
    assert "max_tokens" in err["details"], err
    assert got["deltas"] == [] and got["final"] is None
    assert got["metadata"].get("x-request-id") == "node-bad-1", got["metadata"]
    # the same words the Python client gets
    with pytest.raises(grpc.aio.AioRpcError) as py_err:
        python_generate(address, prompt=PROMPT, max_tokens=0)
    assert py_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and py_err.value.details() == err["details"]
    # a good request with its own id gets that id back in the headers
    ok = node_generate(address, {"request_id": "node-ok-1", "text": PROMPT, "params": {"max_tokens": 2}})
    assert ok["error"] is None and ok["metadata"].get("x-request-id") == "node-ok-1"
    assert ok["final"]["request_id"] == "node-ok-1"
