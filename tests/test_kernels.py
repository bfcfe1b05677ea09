"""model/kernels.py finds mamba_ssm's Triton scan, also in a mamba_ssm built without its CUDA extensions."""

from __future__ import annotations

import sys

import pytest

from synergy_dist.model.kernels import mamba_chunk_scan


def forget_mamba_ssm(monkeypatch) -> None:
    """Drop an installed mamba_ssm that is already imported (model/mamba.py looks for it at import time) from
    sys.modules for this test; monkeypatch puts it back afterwards."""
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def fake_mamba_ssm(tmp_path, monkeypatch):
    """A mamba_ssm laid out like the real one, whose package __init__ imports a CUDA extension that is not built."""
    forget_mamba_ssm(monkeypatch)
    triton = tmp_path / "mamba_ssm" / "ops" / "triton"
    triton.mkdir(parents=True)
    (tmp_path / "mamba_ssm" / "__init__.py").write_text("import selective_scan_cuda\n")
    (tmp_path / "mamba_ssm" / "ops" / "__init__.py").write_text("")
    (triton / "__init__.py").write_text("")
    (triton / "ssd_combined.py").write_text("def mamba_chunk_scan_combined(*args):\n    return 'triton scan'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]


def test_triton_scan_loads_without_the_cuda_extensions(fake_mamba_ssm):
    scan = mamba_chunk_scan()
    assert scan is not None and scan() == "triton scan"


def test_a_broken_scan_module_means_no_kernel(fake_mamba_ssm):
    (fake_mamba_ssm / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py").write_text("1 / 0\n")
    assert mamba_chunk_scan() is None
    assert "mamba_ssm" not in sys.modules


def test_no_mamba_ssm_means_no_kernel(monkeypatch):
    forget_mamba_ssm(monkeypatch)
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import mamba_ssm raises ImportError
    assert mamba_chunk_scan() is None
