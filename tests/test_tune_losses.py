"""bench/tune_losses.py swaps the loss kernels' tiles per candidate: on CPU (Triton's interpreter, fp32), each
candidate must reach the launchers and give the shipped config's loss and first-input gradient, so that
the GPU run times configs that compute the same thing (its own check then guards the GPU's rounding)."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tune_losses as tune  # noqa: E402

nce, rl = (importlib.import_module(f"kernels.{m}") for m in ("infonce", "recon_loss"))  # modules, not functions

LAUNCHED = {"lm": (rl, "_lm_fwd_kernel"), "patch": (rl, "_patch_kernel"), "infonce": (nce, "_infonce_fwd_kernel")}


@pytest.mark.parametrize("loss, shape", [("lm", (70, 64, 1000)), ("patch", (40, 64)), ("infonce", (150, 64))])
def test_every_candidate_tile_is_used_and_computes_the_same_loss(monkeypatch, loss, shape):
    cands = tune.CANDIDATES["infonce" if loss == "infonce" else "gemm"][:3]
    tiles = []
    module, name = LAUNCHED[loss]
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tiles.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Spy())
    group = dict(loss=loss, shape=shape, tma=False, shipped=cands[0], candidates=cands)
    rows = tune.time_group(group, "cpu", torch.float32, timer=lambda fn, device: (fn(), 0.0)[1])
    assert [r["config"] for r in rows] == ["{}x{}x{} w{} s{}".format(*c) for c in cands]
    assert not [r["error"] for r in rows if "error" in r]
    for r in rows:
        assert r["loss_diff"] <= 1e-5 * abs(r["loss_value"]) and r["d_hidden_rel_diff"] <= 1e-5, r
    assert {c[:3] for c in cands} <= set(tiles)  # each candidate's tiles reached the kernel


def test_proposals_rank_tiles_over_the_shapes_of_each_shipped_table():
    def row(loss, shape, config, tma, ms, shipped=False, diff=0.0):
        return dict(loss=loss, shape=shape, config=config, tma=tma, ms_fwd_bwd=ms, shipped=shipped,
                    d_hidden_rel_diff=diff)

    a, b, c = "128x128x32 w8 s3", "128x256x64 w8 s3", "64x256x64 w8 s3"
    rows = [row("lm", "s1", a, False, 10.0, shipped=True), row("lm", "s1", b, True, 5.0),
            row("lm", "s1", c, False, 4.0),
            row("patch", "s2", a, False, 2.0, shipped=True), row("patch", "s2", b, True, 2.0),
            row("patch", "s2", c, False, 1.0, diff=0.5),  # fast, but a different gradient: not ranked anywhere
            row("infonce", "s3", a, False, 3.0, shipped=True), row("infonce", "s3", b, False, 1.5),
            dict(loss="infonce", shape="s3", config=c, tma=False, shipped=False, error="OutOfResources")]
    out = {p["table"]: p for p in tune.proposals(rows)}
    # s1's fastest is c (4 ms; c is not ranked, as it misses s2): a 10/4 and 2/2, b +tma 5/4 and 2/2
    lm = out["recon_loss._launch_cfg"]
    assert (lm["proposed"], lm["shipped"], lm["shapes"]) == (b + " +tma", a, "lm s1, patch s2")
    assert lm["proposed_x"] == pytest.approx(1.25 ** 0.5) and lm["shipped_x"] == pytest.approx(2.5 ** 0.5)
    nce_ = out["infonce._config"]
    assert (nce_["proposed"], nce_["gain"], nce_["proposed_worst"]) == (b, pytest.approx(2.0), pytest.approx(1.0))
