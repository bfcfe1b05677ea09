#!/usr/bin/env bash
# Companion of scripts/gpu_check.sh, run on a machine with network access: puts into .whl/ the wheels that a GPU
# image without network lacks (DeepSpeed, zstandard, mamba_ssm and their missing dependencies), for CPython 3.12
# on x86-64 (change GPU_PYTHON for another image). DeepSpeed and mamba_ssm are built here as pure-Python wheels:
# DeepSpeed JIT-compiles its ops when asked (this project uses none), and mamba_ssm without its CUDA extensions
# still has the Triton SSD kernels this project calls (model/kernels.py loads them without its package __init__).
#
#   scripts/gpu_wheels.sh            # then: carry .whl to the GPU machine and run scripts/gpu_check.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"  # needs torch (the mamba_ssm build imports it) and pip
GPU_PYTHON="${GPU_PYTHON:-3.12}"
DEST=.whl
mkdir -p "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude

# the versions this checkout is tested with on CPU
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DEEPSPEED="$(version deepspeed)"

DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$DEEPSPEED" -w "$DEST"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    "$PY" -m pip wheel -q --no-deps --no-build-isolation "mamba-ssm==2.3.2.post1" -w "$DEST"
# binary and pure wheels the image does not have (it has einops, msgpack, ninja, psutil, py-cpuinfo, numpy, torch,
# triton, pyarrow, safetensors, transformers)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
    "zstandard==$(version zstandard)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic_core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
    "hjson==$(version hjson)"
ls -la "$DEST"
du -sh "$DEST"
