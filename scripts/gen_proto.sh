#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC stubs under pearl/v1/ from proto/pearl/v1/*.proto.
# `scripts/gen_proto.sh --check` fails when the committed stubs are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" proto/pearl/v1/*.proto
touch "$out/pearl/__init__.py" "$out/pearl/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r -x __pycache__ "$out/pearl" pearl >/dev/null; then
    echo "protobuf stubs in pearl/v1 are stale: run scripts/gen_proto.sh" >&2
    diff -r -x __pycache__ "$out/pearl" pearl | head -20 >&2
    exit 1
  fi
  echo "protobuf stubs are fresh"
else
  rm -rf pearl && cp -r "$out/pearl" pearl
  echo "wrote pearl/v1"
fi
