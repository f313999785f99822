#!/bin/sh
# Generates the Python stubs beside each .proto (messages, gRPC, and .pyi type stubs
# for both, so `from strata.kv.v1 import kv_pb2` works and type-checks) and
# strata.protoset, which keeps the comments for reflection (grpcurl describe).
# Usage: protos/generate.sh PYTHON, a Python with the locked codegen group.
set -eu
py=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
cd "$(dirname "$0")"
protos=$(find strata -name '*.proto' | sort)
# shellcheck disable=SC2086  # one argument per .proto file
"$py" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. --mypy_grpc_out=. \
	--plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" $protos
# shellcheck disable=SC2086
"$py" -m grpc_tools.protoc -I. --include_imports --include_source_info \
	--descriptor_set_out=strata.protoset $protos
