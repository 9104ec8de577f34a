#!/usr/bin/env bash
# Regenerate the protobuf/gRPC stubs in pearl_runtime/pb/ from proto/**/*.proto (pearl/v1 and
# the KServe v2 inference/ protos), with their imports rewritten to the package
# (`from pearl_runtime.pb import common_pb2`).
# `scripts/gen_proto.sh --check` fails when the committed stubs are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY");; esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mapfile -t protos < <(cd proto && find . -name '*.proto' | sed 's|^\./||' | sort)
# the stubs land in one flat package: two protos of one file name would overwrite each other
dup=$(printf '%s\n' "${protos[@]##*/}" | sort | uniq -d)
if [ -n "$dup" ]; then echo "proto file names must be unique across proto/: $dup" >&2; exit 1; fi
mkdir -p "$tmp/gen"
(cd proto && "$PY" -m grpc_tools.protoc -I. --python_out="$tmp/gen" --grpc_python_out="$tmp/gen" \
  --pyi_out="$tmp/gen" "${protos[@]}")
mkdir -p "$tmp/pb"
find "$tmp/gen" -name '*_pb2*' -exec cp {} "$tmp/pb/" \;
# generated modules import each other by their proto path (`from pearl.v1 import x_pb2`,
# `from inference import model_config_pb2`)
sed -i -E '/^from google/!s/^from [a-z_.0-9]+ import ([a-z_0-9]+_pb2)\b/from pearl_runtime.pb import \1/' "$tmp"/pb/*
printf '"""Generated protobuf and gRPC stubs (scripts/gen_proto.sh); never edited by hand."""\n' > "$tmp/pb/__init__.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r -x __pycache__ "$tmp/pb" pearl_runtime/pb >/dev/null; then
    echo "protobuf stubs in pearl_runtime/pb are stale: run scripts/gen_proto.sh" >&2
    diff -r -x __pycache__ "$tmp/pb" pearl_runtime/pb | head -20 >&2
    exit 1
  fi
  echo "protobuf stubs are fresh"
else
  rm -rf pearl_runtime/pb && cp -r "$tmp/pb" pearl_runtime/pb
  echo "wrote pearl_runtime/pb"
fi
