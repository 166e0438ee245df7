"""The attention benchmark's summary (#14's targets) on hand-made rows: a shape where ours failed counts as
a failed speedup, never as a shape left out of the minimum."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_attention  # noqa: E402


def _row(provider, shape, pass_, tflops):
    return dict(provider=provider, shape=f"{shape} B=1 T=1 H=1/1 D=128", **{"pass": pass_}, ms=1.0, tflops=tflops)


def test_min_speedup_covers_every_shape_and_counts_a_failure_as_zero():
    rows = [_row("ours", "uniform-4096", "fwd", 600.0), _row("sdpa_padded", "uniform-4096", "fwd", 500.0),
            _row("ours", "mmeb-mixed", "fwd", 300.0), _row("torch_varlen_attn", "mmeb-mixed", "fwd", 200.0),
            _row("ours", "mmeb-mixed-d80", "fwd", 270.0), _row("torch_varlen_attn", "mmeb-mixed-d80", "fwd", 150.0),
            dict(provider="ours", shape="cl-texts B=1 T=1 H=1/1 D=128", note="CompilationError: ..."),
            _row("torch_varlen_attn", "cl-texts", "fwd", 100.0)]
    out = bench_attention.summary(rows)
    assert out["attn_fwd_min_speedup_over_best_peer"] == 0.0  # cl-texts: ours failed
    assert out["attn_fwd_speedup_per_shape"] == "uniform-4096=1.20 mmeb-mixed=1.50 mmeb-mixed-d80=1.80 cl-texts=0.00"
    assert out["attn_fwd_tflops_uniform-4096"] == 600.0
    assert out["attn_fwd_d80_over_d128"] == pytest.approx(0.9)
    assert "attn_fwd_min_speedup_over_best_peer_tma" not in out  # a variant that did not run says nothing


def test_a_peer_not_installed_is_a_row_on_cuda_not_a_silent_gap(monkeypatch):
    """flash-attn / Liger / CCE / Inf-CL missing: their providers raise ImportError naming the package (the run
    records a row), and the reference release's all-positions row falls back to a peer that is installed."""
    import builtins

    import bench_infonce
    import bench_recon_loss

    real_import = builtins.__import__
    absent = ("flash_attn", "xformers", "liger_kernel", "cut_cross_entropy", "inf_cl")

    def no_peers(name, *args, **kwargs):
        if name.split(".")[0] in absent:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peers)
    attn = bench_attention.providers("cuda")
    lm = bench_recon_loss._lm_providers("cuda")
    for fn, package in ((attn["flash_attn"], "flash-attn"), (attn["xformers"], "xformers"),
                        (lm["liger-flce"], "liger-kernel"), (lm["cce"], "cut-cross-entropy"),
                        (bench_infonce._inf_cl(), "inf-cl")):
        with pytest.raises(ImportError, match=f"{package} not installed"):
            fn(None, None, None)
    assert "flash_attn" not in bench_attention.providers("cpu")  # a CPU never has it: no noise rows there
    assert bench_recon_loss._release_provider(lm) in ("torch-lce", "torch-naive")
