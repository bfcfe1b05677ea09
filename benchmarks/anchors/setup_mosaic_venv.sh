#!/usr/bin/env bash
# Create the MosaicML `streaming` venv that `python -m benchmarks.data_anchors` drives as an anchor.
# streaming imports torchvision (and transformers) at import time, so it gets its own venv outside
# the repository; its other pinned extras (cloud SDKs, ...) are not needed for local MDS shards.
# usage: bash setup_mosaic_venv.sh [VENV_DIR]   (default /work/bench-venvs/mosaic)
set -euo pipefail
venv="${1:-/work/bench-venvs/mosaic}"
python3 -m venv "$venv"
pip="$venv/bin/pip"
nice -n 19 "$pip" install torch==2.14.1 torchvision==0.29.1
"$pip" install --no-deps mosaicml-streaming==0.13.0
"$pip" install "numpy<2.2" "transformers<5" Brotli python-snappy xxhash "zstd<2" catalogue tqdm zstandard
OMP_NUM_THREADS=1 "$venv/bin/python" -c "import streaming; print('mosaicml-streaming', streaming.__version__, 'ready')"
echo "use: python -m benchmarks.data_anchors --mosaic-python $venv/bin/python"
