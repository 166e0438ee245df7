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
