"""The sm_90 compile gate in the CPU suite: every Triton kernel compiles for an H100/H200 without spills.

The Triton interpreter accepts code that the real compiler rejects (issue #12: a plain-float global
read by a jitted kernel), so the CPU tests of the kernels cannot see that class of fault. This runs
bench/compile_gate.py in a subprocess with TRITON_INTERPRET=0 (conftest turns the interpreter on in
this process, and triton.jit picks interpreter or compiler when the kernel modules are imported),
and checks its rows: coverage is in that script's docstring. Cold, it compiles 729 kernels (5 min
wall on two cores); Triton's cache makes later runs take ~15 s for unchanged kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from kernels import tuned
from kernels.attention import candidates

ROOT = Path(__file__).resolve().parents[1]
SHARED_LIMIT = 227 * 1024


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_gate.py"), "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert out.exists(), f"the gate wrote no rows (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _where(r):
    return f"{r['kernel']} [{r['spec']}] {r['config']}"


def test_every_kernel_and_config_compiles_for_sm90(rows):
    errors = [f"{_where(r)}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)


def test_shipped_configs_do_not_spill(rows):
    spills = [f"{_where(r)}: STACK {r['stack']} LOCAL {r['local']}" for r in rows
              if r["shipped"] and not r["error"] and (r["stack"] or r["local"])]  # fmt: skip
    assert not spills, "\n".join(spills)


def test_shipped_configs_fit_sm90_shared_memory(rows):
    over = [f"{_where(r)}: {r['shared']} B" for r in rows
            if r["shipped"] and not r["error"] and r["shared"] > SHARED_LIMIT]  # fmt: skip
    assert not over, "\n".join(over)


def test_gate_covers_every_kernel_specialization_and_shipped_config(rows):
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"attn_fwd", "attn_dkdv", "attn_dq", "attn_preprocess", "lm_fwd", "lm_dlogits", "mm_acc",
                       "lm_ce_grad", "mm_acc_dw", "patch_loss", "patch_loss_grad", "infonce_fwd", "infonce_dscores"}
    for name in tuned.KERNELS:
        specs = " | ".join(r["spec"] for r in rows if r["kernel"] == f"attn_{name}")
        for d in (40, 64, 72, 80, 96, 128):
            for dtype in ("fp16", "bf16", "fp32"):
                for g in (1, 2, 7, 8):
                    assert f"D={d} {dtype} G={g}" in specs, (name, d, dtype, g)
                    assert f"D={d} {dtype} G={g} packed" in specs, (name, d, dtype, g, "packed")
        compiled = {packed: {r["config"] for r in rows
                             if r["kernel"] == f"attn_{name}" and r["spec"].endswith("packed") == packed}
                    for packed in (False, True)}  # fmt: skip
        for packed in (False, True):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for bucket in (64, 8192):
                    cfg = tuned.attention_config("sm90", name, 128, dtype, bucket, packed)
                    label = "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)
                    assert label + (" tma" if cfg["TMA"] else "") in compiled[packed]
                    if dtype == torch.bfloat16:  # the TMA variant of every shipped bf16 config
                        assert label + " tma" in compiled[packed]
                    if name == "dkdv" and dtype != torch.float32:  # with the fused dq (MOCA_FUSED_DQ=1)
                        cfg = tuned.attention_config("sm90", name, 128, dtype, bucket, packed, fused_dq=True)
                        label = "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)
                        if dtype == torch.bfloat16 or tuned.FUSED_DQ["sm90"]:
                            assert label + " fused_dq" in compiled[packed]
                            assert label + " tma fused_dq" in compiled[packed]
        cands = {"{}x{} w{} s{}".format(*c) for c in candidates(name)}
        assert cands <= compiled[False], cands - compiled[False]
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    for name in tuned.WS_KERNELS if tuned.ws_available("sm90", version) else ():  # at this Triton's tiles
        cfg = tuned.ws_config("sm90", name, version)
        label = "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages} tma ws".format(**cfg)
        ws = {r["spec"]: r["warps"] for r in rows if r["kernel"] == f"attn_{name}" and r["config"] == label}
        assert {f"D={d} bf16 G={g}" for d in (64, 80, 128) for g in (1, 8)} <= set(ws), (name, sorted(ws))
        assert all(warps == 3 * cfg["num_warps"] for warps in ws.values()), ws  # three warp groups launched
    for name in ("lm_fwd", "lm_dlogits", "mm_acc", "mm_acc_dw", "patch_loss", "patch_loss_grad"):
        configs = {r["config"] for r in rows if r["kernel"] == name and r["spec"].startswith("bf16")}
        assert any(c.endswith(" tma") for c in configs) and any(not c.endswith(" tma") for c in configs), name


def test_gate_for_an_a10_compiles_without_hopper_variants_within_its_shared_memory(tmp_path):
    """`--arch 86` (A10, A6000, RTX 3090): sm_86 cubins, no TMA or fused-dq variant (Hopper-only), each shipped
    launch spill-free within 99 KiB (the whole table for sm_80/86/89: bench/results/sm*-compile-gate.md)."""
    out = tmp_path / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_gate.py"), "--arch", "86", "--only",
                           "infonce_dscores", "--json", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert {r["spec"] for r in rows} == {"fp16 B=4096", "bf16 B=4096", "fp32 B=4096"}
    assert all(r["shipped"] and not r["error"] and "tma" not in r["config"] for r in rows)
    assert all(0 < r["shared"] <= 99 * 1024 and r["local"] == 0 for r in rows)
    assert "128x128x64 w8 s3" in {r["config"] for r in rows}  # the sm_90 tiles: the loss tiles know no arch
