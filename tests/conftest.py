"""Test-wide settings: CPU runs use Triton's interpreter, so it must be on before triton loads."""

import os

# The interpreter's many small numpy matmuls crawl with threaded OpenBLAS on a 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _shipped_kernel_variants(monkeypatch):
    """Every test starts from the shipped kernel variants whatever the shell exports (MOCA_TMA, MOCA_FUSED_DQ,
    MOCA_AUTOTUNE); the tests of a variant set its knob themselves."""
    for knob in ("MOCA_TMA", "MOCA_FUSED_DQ", "MOCA_AUTOTUNE"):
        monkeypatch.delenv(knob, raising=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
