#!/usr/bin/env bash
# Fetch, for the GPU machine (Python 3.12, x86-64, no network there), the wheels constrained decoding needs
# beyond its image: xgrammar (the `guided` extra) with apache-tvm-ffi and pydantic, and jsonschema for the
# tests (torch, transformers, triton and numpy are the image's; attrs and typing-extensions come along, newer
# than or as new as the image's, which pydantic needs). About 8 MB.
# Usage: scripts/guided-wheels.sh [.whl-guided]     then on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl-guided/*.whl
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
# Environment: PYTHON (default python3).
set -euo pipefail
dest=${1:-.whl-guided}
py=${PYTHON:-python3}
mkdir -p "$dest"
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
binary="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 $plat"
# Small closures with their dependencies; xgrammar alone (its torch, transformers and triton are the image's).
# shellcheck disable=SC2086
"$py" -m pip download -q $binary -d "$dest" pydantic apache-tvm-ffi "jsonschema>=4.18"
# shellcheck disable=SC2086
"$py" -m pip download -q $binary --no-deps -d "$dest" "xgrammar==0.2.9"
ls -1 "$dest"
du -sh "$dest"
