#!/usr/bin/env bash
# The one GPU check: on a CUDA machine without network, with the wheels of scripts/gpu_wheels.sh in .whl/.
# Runs `pytest -m gpu` (tests/test_gpu.py: CUDA vs CPU, kernel paths vs PyTorch paths, a DeepSpeed step on NCCL,
# cached generation, a compiled step, synergy-plan against CUDA memory) and the GPU throughput benchmark
# (`synergy-bench model --device cuda`: bytes/s, MFU against a measured bf16 matmul, peak memory, tiny and ~100M
# configs, eager and compiled), and writes everything into OUT (default gpu_check_out/): gpu_tests.log,
# gpu_tests.xml + gpu_compiled.xml, model.json and model.md (the table). Planned to take under 8 minutes on one
# H200 or H100.
#
#   scripts/gpu_check.sh                   # OUT=/path scripts/gpu_check.sh to choose the folder
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="$PWD:/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: no wheels in .whl/ (scripts/gpu_wheels.sh makes them); tests needing DeepSpeed or zstandard skip"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

# The compiled (inductor) test runs alone, after the others: generated code that crashes the process (torch 2.11's
# CPU code for these blocks did, docs/TRAINING.md) then takes only its own result with it.
timeout 200 "$PY" -m pytest -m gpu tests/test_gpu.py -k "not compiled" -q -rs -p no:cacheprovider \
    --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
TESTS=${PIPESTATUS[0]}
timeout 120 "$PY" -m pytest -m gpu tests/test_gpu.py -k compiled -q -rs -p no:cacheprovider \
    --junitxml "$OUT/gpu_compiled.xml" 2>&1 | tee -a "$OUT/gpu_tests.log"
COMPILED=${PIPESTATUS[0]}

timeout 240 "$PY" -m synergy_dist.cli.bench model --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"
BENCH=${PIPESTATUS[0]}

echo "gpu_check: tests exit $TESTS, compiled test exit $COMPILED, benchmark exit $BENCH; results in $OUT/"
[ "$TESTS" -eq 0 ] && [ "$COMPILED" -eq 0 ] && [ "$BENCH" -eq 0 ]
