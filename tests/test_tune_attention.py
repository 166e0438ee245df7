"""bench/tune_attention.py compiles the attention candidates ahead of the autotuner that times them: its
precompiles are only worth their time if each one is a Triton cache hit for the launch that follows.

tests/tune_keys.py (a subprocess: the binder needs the compiled-mode kernels, conftest turns the
interpreter on here) builds each launch's cache key three ways: captured from the launchers with a
candidate's tiles put in (the tuner's precompile), by hand in bench/compile_gate.py (what gpu-check's
gate compiles for the benchmarks) and as Triton's autotuner launches it under MOCA_AUTOTUNE=1 (each
candidate's pre_hook applied, its Config's kwargs added). Every tiling (packed, per segment, both) and
variant (plain, TMA, fused dq) of the benchmark's shapes is covered. It also checks that the tuner files each
launch under the kernels/tuned.py rule that decided it (what its proposed rules are per).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ["vision-window:plain", "vision-window:tma", "vision-window:fused_dq", "uniform-4096:plain",
         "uniform-4096:tma", "uniform-4096:fused_dq", "mmeb-mixed:plain", "mmeb-mixed:tma", "mmeb-mixed:fused_dq",
         "mmeb-mixed-d80:tma", "vision-full:tma"]


def test_precompiled_attention_launches_are_the_launches_that_run():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "tune_keys.py"), *PAIRS], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["mismatches"], "\n".join(out["mismatches"])
    # each pair: every launch (fwd, dk/dv and, unless fused, dq; each twice in a mixed batch) with its 15-18 candidates
    assert all(out["checked"][p] >= 16 * (2 if p.endswith("fused_dq") else 3) for p in PAIRS), out["checked"]
