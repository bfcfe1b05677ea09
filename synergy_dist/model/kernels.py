"""Optional fused kernels, found at import time: mamba_ssm's Triton SSD scan.

mamba_ssm's package __init__ imports its CUDA extensions (selective_scan_cuda), so a mamba_ssm built without
them (MAMBA_SKIP_CUDA_BUILD=TRUE: no nvcc run, minutes saved, a pure-Python wheel) fails to import as a
package, although the Triton SSD kernels this project calls need none of them. mamba_chunk_scan() then loads
those Triton modules alone, under a bare `mamba_ssm` package whose __init__ is not run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable

SCAN_MODULE = "mamba_ssm.ops.triton.ssd_combined"


def mamba_chunk_scan() -> Callable | None:
    """mamba_ssm's `mamba_chunk_scan_combined`, or None where mamba_ssm (or Triton) is unavailable."""
    try:
        return importlib.import_module(SCAN_MODULE).mamba_chunk_scan_combined
    except ImportError as err:
        if "selective_scan_cuda" not in str(err) and "causal_conv1d_cuda" not in str(err):
            return None  # mamba_ssm or triton is missing: the PyTorch scan it is
    except Exception:  # noqa: BLE001 - a broken install counts as "not available"
        return None
    return _load_without_package_init()


def _load_without_package_init() -> Callable | None:
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["mamba_ssm"] = package
    try:
        return importlib.import_module(SCAN_MODULE).mamba_chunk_scan_combined
    except Exception:  # noqa: BLE001
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]
        return None
