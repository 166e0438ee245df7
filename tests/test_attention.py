"""varlen_attention: the Triton kernel (through the interpreter on CPU) and the torch reference
against a dense float64 oracle written here, outputs and gradients.

Rule (flash-attention's): err(ours) <= 2 * err(torch reference in the same dtype) + small tol,
with err the max abs difference to the float64 oracle, the same upstream gradient everywhere.
"""

import functools

import pytest
import torch
import triton

from kernels import attention, tuned, varlen_attention
from kernels.attention import varlen_attention_torch

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
MIXED = [1, 7, 97, 131, 257]


def cu_of(lens, device="cpu"):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def dense_fp64(q, k, v, cu_seqlens, scale=None):
    """Oracle: softmax(q k^T * scale + block-diagonal mask) v over all T tokens at once, in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lens), device=q.device), lens)  # (T,)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("thd,shd->hts", q, k) * scale
    s = s.masked_fill(seg[None, :, None] != seg[None, None, :], float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v)


def make_inputs(lens, hq, hkv, d, dtype, device="cpu"):
    cu = cu_of(lens, device)
    T = int(sum(lens))
    q, k, v = (torch.randn(T, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    return q, k, v, cu, max(lens)


def fwd_bwd(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do.to(o.dtype)))


def errors(results, truth):
    return [(r.double() - t).abs().max().item() if r.numel() else 0.0 for r, t in zip(results, truth)]


def check(lens, hq, hkv, d, dtype, device="cpu", scale=None):
    """Ours (triton) and the reference in `dtype` against the fp64 oracle: outputs, dq, dk, dv."""
    q, k, v, cu, max_len = make_inputs(lens, hq, hkv, d, dtype, device)
    do = torch.randn(q.shape, device=device, dtype=torch.float64)
    ours = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max_len, scale, backend="triton"), q, k, v, do)
    ref = fwd_bwd(lambda a, b, c: varlen_attention_torch(a, b, c, cu, max_len, scale), q, k, v, do)
    truth = fwd_bwd(lambda a, b, c: dense_fp64(a, b, c, cu, scale), q.double(), k.double(), v.double(), do)
    for x, t in zip(ours, truth):
        assert x.dtype == dtype and x.shape == t.shape
    for name, e_ours, e_ref in zip(("out", "dq", "dk", "dv"), errors(ours, truth), errors(ref, truth)):
        assert e_ours <= 2 * e_ref + TOL[dtype], f"{name}: ours {e_ours:.3g} vs reference {e_ref:.3g}"


# ----------------------------------------------------------------------------- CPU (interpreter)


@pytest.mark.parametrize(
    "lens, hq, hkv, d, dtype",
    [
        (MIXED, 2, 2, 64, torch.float32),  # awkward lengths, GQA 1
        (MIXED, 2, 1, 80, torch.float32),  # vision head dim (64 + 16 split), GQA 2
        (MIXED, 2, 2, 128, torch.float16),
        ([7, 131, 1], 8, 1, 64, torch.float16),  # GQA 8
        ([33, 1, 70], 4, 2, 96, torch.float16),  # 96 = 64 + 32
        ([203], 2, 2, 80, torch.float32),  # one segment
        ([0, 5, 0, 40, 0], 2, 1, 64, torch.float32),  # empty segments
    ],
)
def test_triton_matches_fp64(lens, hq, hkv, d, dtype):
    check(lens, hq, hkv, d, dtype)


def test_many_tiny_segments():
    lens = torch.randint(1, 13, (20,)).tolist()
    check(lens, 2, 1, 64, torch.float32)


def test_custom_scale_and_odd_head_dim():
    check([9, 40], 2, 2, 40, torch.float32, scale=0.3)  # 40 = 32 + masked 16-wide tail


def test_strided_views_of_fused_qkv():
    """q/k/v as column slices of one (T, (Hq + 2 Hkv) * D) projection, as the model passes them."""
    lens, hq, hkv, d = [17, 64], 4, 2, 80
    cu, T = cu_of(lens), sum(lens)
    qkv = torch.randn(T, (hq + 2 * hkv) * d)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)
    assert not q.is_contiguous()
    do = torch.randn(T, hq, d, dtype=torch.float64)
    ours = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, 64, backend="triton"), q, k, v, do)
    truth = fwd_bwd(lambda a, b, c: dense_fp64(a, b, c, cu), q.double(), k.double(), v.double(), do)
    assert max(errors(ours, truth)) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_cu_seqlens_max_seqlen_and_scale_are_errors(backend):
    """A cu_seqlens that does not run from 0 to T, decreases, or has a segment longer than max_seqlen would
    make the kernels read and write out of bounds or leave rows unwritten: a ValueError instead."""
    q, k, v, cu, max_len = make_inputs([10, 100], 2, 1, 16, torch.float32)
    run = functools.partial(varlen_attention, q, k, v, backend=backend)
    for bad, message in [([0, 10, 120], "from 0 to T = 110, got 0 .. 120"), ([0, 10, 100], "0 .. 100"),
                         ([5, 10, 110], "5 .. 110"), ([0, 60, 50, 110], "must not decrease .segment 1"),
                         ([0], "0 .. 0")]:
        with pytest.raises(ValueError, match=message):
            run(torch.tensor(bad, dtype=torch.int32), 128)
    with pytest.raises(ValueError, match="empty"):
        run(torch.tensor([], dtype=torch.int32), 128)
    with pytest.raises(ValueError, match="max_seqlen 64 is below the longest segment's 100"):
        run(cu, 64)  # an understated max_seqlen took the packed tiles, which skip the 100-token segment
    for scale in (0.0, -0.25, float("nan")):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            run(cu, max_len, scale)
    run(cu, max_len)
    cu[-1] += 5  # changed in place after a check: checked again
    with pytest.raises(ValueError, match="0 .. 115"):
        run(cu, max_len)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_shapes_are_the_same_errors_on_every_backend(backend):
    """The torch backend raised SDPA's RuntimeError for a head-dim or GQA mismatch and took an int64 cu_seqlens."""
    q, k, v, cu, max_len = make_inputs([10, 20], 4, 2, 16, torch.float32)
    run = functools.partial(varlen_attention, backend=backend)
    for args, message in [((q, k[..., :8], v[..., :8], cu), r"q \(30, 4, 16\) vs k \(30, 2, 8\)"),
                          ((q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu), "multiple of Hkv"),
                          ((q, k, v[:, :, :8], cu), r"k/v: \(T, Hkv, D\)"),
                          ((q, k, v, cu.long()), "int32 on q's device, got .3,. torch.int64")]:
        with pytest.raises(ValueError, match=message):
            run(*args, max_len)


def test_inference_mode():
    """Inference tensors keep no version counter (the server embeds under torch.inference_mode)."""
    q, k, v, cu, max_len = make_inputs([5, 7], 2, 1, 16, torch.float32)
    with torch.inference_mode():
        q, k, v, cu = (x.clone() for x in (q, k, v, cu))
        out = varlen_attention(q, k, v, cu, max_len, backend="triton")
        with pytest.raises(ValueError, match="max_seqlen 6 is below"):
            varlen_attention(q, k, v, cu, 6, backend="triton")
    assert (out.double() - dense_fp64(q, k, v, cu)).abs().max() < 1e-5


def test_strided_cu_seqlens():
    q, k, v, cu, max_len = make_inputs([5, 7], 2, 1, 16, torch.float32)
    strided = torch.stack([cu, torch.full_like(cu, 999)], 1)[:, 0]  # every other int32 of a buffer
    assert not strided.is_contiguous()
    do = torch.randn(q.shape, dtype=torch.float64)
    ours = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, strided, max_len, backend="triton"), q, k, v, do)
    truth = fwd_bwd(lambda a, b, c: dense_fp64(a, b, c, cu), q.double(), k.double(), v.double(), do)
    assert max(errors(ours, truth)) < 1e-5


def test_backends_agree():
    q, k, v, cu, max_len = make_inputs([3, 50, 29], 2, 1, 64, torch.float32)
    do = torch.randn(q.shape, dtype=torch.float64)
    a = fwd_bwd(lambda x, y, z: varlen_attention(x, y, z, cu, max_len, backend="triton"), q, k, v, do)
    b = fwd_bwd(lambda x, y, z: varlen_attention(x, y, z, cu, max_len, backend="torch"), q, k, v, do)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_reference_matches_fp64(dtype):
    """The reference itself (the CPU backend and the yardstick above), including empty segments."""
    lens, tol = [5, 0, 61, 1, 33], {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    q, k, v, cu, max_len = make_inputs(lens, 4, 2, 32, dtype)
    do = torch.randn(q.shape, dtype=torch.float64)
    ref = fwd_bwd(lambda a, b, c: varlen_attention_torch(a, b, c, cu, max_len), q, k, v, do)
    truth = fwd_bwd(lambda a, b, c: dense_fp64(a, b, c, cu), q.double(), k.double(), v.double(), do)
    assert max(errors(ref, truth)) < tol


def assert_segments_do_not_leak(lens, dtype=torch.float32):
    """Changing the middle segment's queries, keys and values leaves every other segment's output bit-identical."""
    q, k, v, cu, max_len = make_inputs(lens, 2, 2, 64, dtype)
    lo, hi = lens[0], lens[0] + lens[1]
    out = varlen_attention(q, k, v, cu, max_len, backend="triton")
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[lo:hi] *= -2.0
    k2[lo:hi] += 3.0
    v2[lo:hi] -= 1.0
    out2 = varlen_attention(q2, k2, v2, cu, max_len, backend="triton")
    assert torch.equal(out[:lo], out2[:lo]) and torch.equal(out[hi:], out2[hi:])
    assert not torch.allclose(out[lo:hi], out2[lo:hi])


def test_segments_do_not_leak():
    assert_segments_do_not_leak([20, 45, 9])


# ----------------------------------------------------------------------------- packed tiles (short segments)
AWKWARD = [1, 7, 63, 64, 65]


@pytest.fixture
def all_packed(monkeypatch):
    """Every batch on the packed-tile kernels, whatever its longest segment: they are correct for any
    length (the threshold only picks the faster path), and long segments make tiles cut segments."""
    monkeypatch.setattr(tuned, "PACKED_MAX_SEQLEN", 1 << 30)


@pytest.mark.parametrize(
    "lens, hq, hkv, d, dtype",
    [
        ([*AWKWARD, 64, 1, 63, 7, 65, 2], 2, 2, 64, torch.float32),  # GQA 1
        ([65, 1, 64, 7, 63] * 2, 4, 2, 80, torch.float16),  # GQA 2, vision head dim
        (AWKWARD, 3, 1, 40, torch.float32),  # GQA 3, head dim 40 = 32 + masked 16-wide tail
        ([131, 5, 257, 1], 2, 1, 128, torch.float16),  # segments longer than a packed tile
        ([0, 3, 0, 0, 9, 1, 0], 2, 1, 64, torch.float32),  # empty segments, inside and at both ends
    ],
)
def test_packed_matches_fp64(all_packed, lens, hq, hkv, d, dtype):
    check(lens, hq, hkv, d, dtype)


@pytest.fixture
def packed_launches(monkeypatch):
    """Counts the batches that take the packed kernels (each builds the per-token segment ids once
    for the forward and once for the backward)."""
    calls = []

    def spy(cu_seqlens, n_tokens):
        calls.append(n_tokens)
        return segment_ids(cu_seqlens, n_tokens)

    segment_ids = attention._segment_ids
    monkeypatch.setattr(attention, "_segment_ids", spy)
    return calls


def test_segment_ids():
    cu = cu_of([0, 2, 0, 3, 1, 0, tuned.PACKED_MAX_SEQLEN + 1, 1])
    ids = attention._segment_ids(cu, 8 + tuned.PACKED_MAX_SEQLEN).tolist()
    assert ids == [1, 1, 3, 3, 3, 4, *[-1] * (tuned.PACKED_MAX_SEQLEN + 1), 7]  # -1: long, left to per-segment


def test_vision_windows_take_packed_tiles(packed_launches):
    """Windows of 64 patches and smaller edge windows (the vision tower), at the shipped threshold."""
    lens = [64, 64, 32, 64, 64, 16, 64, 48]
    check(lens, 2, 2, 80, torch.float16)
    assert packed_launches == [sum(lens)] * 2


def test_1000_tiny_segments_packed(packed_launches):
    lens = torch.randint(1, 9, (1000,)).tolist()
    check(lens, 2, 1, 64, torch.float32)
    assert packed_launches == [sum(lens)] * 2


@pytest.mark.parametrize(
    "lens, hq, hkv, d, dtype",
    [
        ([1, 7, 63, 64, 65, 200, 3, 130, 64, 16], 2, 1, 64, torch.float32),  # short and long interleaved
        ([0, 70, 5, 0, 90, 2, 2, 0], 4, 2, 80, torch.float16),  # empty ones; long segments cut packed tiles
    ],
)
def test_mixed_batch_runs_both_kernels(packed_launches, lens, hq, hkv, d, dtype):
    """Short segments on packed tiles, long ones per segment, in one batch (a CL batch of MMEB)."""
    assert attention.path(max(lens), sum(lens), len(lens)) == "mixed"
    check(lens, hq, hkv, d, dtype)
    assert packed_launches == [sum(lens)] * 2


def test_long_segments_keep_per_segment_tiles(packed_launches):
    lens = [2 * tuned.MIXED_MAX_MEAN, 1]  # a mean length above MIXED_MAX_MEAN
    check(lens, 2, 1, 64, torch.float32)
    assert packed_launches == []


# ----------------------------------------------------------------------------- TMA descriptors (streamed tiles)


@pytest.fixture
def tma_launches(monkeypatch):
    """TMA forced on (MOCA_TMA=1, as a benchmark or a tuned config asks): records, per kernel launch,
    whether its streamed tiles came through descriptors. TMA tiles read past a segment's end into the next
    segment's tokens, where pointer loads read zeros: only the score masks keep those out."""
    monkeypatch.setenv("MOCA_TMA", "1")
    calls = []

    def spy(streamed, rows, d0, d1):
        calls.append(streamed is not None)
        return descriptors(streamed, rows, d0, d1)

    descriptors = attention._descriptors
    monkeypatch.setattr(attention, "_descriptors", spy)
    return calls


@pytest.mark.parametrize(
    "lens, hq, hkv, d, dtype, kernels",
    [
        ([300, 1, 257, 97, 700], 4, 2, 64, torch.float32, "segments"),
        ([1, 7, 63, 64, 2, 30, 64], 2, 1, 80, torch.float16, "packed"),  # head dim 80: two descriptors (64 + 16)
        ([1, 7, 63, 64, 65, 200, 3, 130, 64, 16], 8, 1, 96, torch.float32, "mixed"),
        ([0, 800, 0], 2, 2, 128, torch.float16, "segments"),  # many key tiles; empty segments at both ends
    ],
)
def test_tma_matches_fp64(tma_launches, lens, hq, hkv, d, dtype, kernels):
    assert attention.path(max(lens), sum(lens), len(lens)) == kernels
    check(lens, hq, hkv, d, dtype)
    assert tma_launches == [True] * 3 * (2 if kernels == "mixed" else 1)  # fwd, dk/dv, dq; each twice when mixed


def test_tma_segments_do_not_leak(tma_launches):
    """The segment after a changed one starts inside the changed one's last tiles: with TMA they load it."""
    assert_segments_do_not_leak([200, 345, 290])  # per-segment tiles (mean > MIXED_MAX_MEAN), run past each end
    assert tma_launches == [True, True]


def test_tma_falls_back_on_a_masked_head_dim(tma_launches):
    """Head dim 40 (32 + a 16-wide tail masked to 8): a 16-column tile would read the next head, so pointer loads."""
    check([9, 70, 3], 2, 1, 40, torch.float32)
    assert tma_launches == [False] * 6  # a mixed batch: both kernels


def test_tma_needs_aligned_heads_in_a_token():
    x = torch.empty(10, 4, 64)
    assert attention._tma_ok((x, x), 64, 64, 0)
    assert attention._tma_ok((x[:, :2],), 64, 64, 0)  # a head slice of a fused projection: heads still adjacent
    assert not attention._tma_ok((x.transpose(0, 1).contiguous().transpose(0, 1),), 64, 64, 0)  # head-major
    assert not attention._tma_ok((torch.empty(10, 4, 72)[..., :64],), 64, 64, 0)  # heads 72 apart
    assert not attention._tma_ok((x.expand(10, 4, 64)[:1].expand(10, 4, 64),), 64, 64, 0)  # rows overlap (stride 0)
    assert not attention._tma_ok((torch.empty(40 * 4 * 64 + 1)[1:].view(40, 4, 64),), 64, 64, 0)  # base misaligned


# ----------------------------------------------------------------------------- warp-specialized fwd and dq (WS)


@pytest.fixture
def ws_launches(monkeypatch):
    """MOCA_WS=1 (as bench_attention's ours_ws or tuned.WARP_SPECIALIZE asks): records, per kernel launch, the
    kernel, its tiling and whether it ran the warp-specialized form (one masked key loop, every tile through
    TMA descriptors)."""
    monkeypatch.setenv("MOCA_WS", "1")
    calls = []

    def spy(name, grid, ptrs, sched, rest, meta, cfg, streamed):
        calls.append((name, "packed" if meta["PACKED"] else "segments", meta.get("WS", False)))
        return run(name, grid, ptrs, sched, rest, meta, cfg, streamed)

    run = attention._run
    monkeypatch.setattr(attention, "_run", spy)
    return calls


@pytest.mark.parametrize(
    "lens, hq, hkv, d, dtype",
    [
        ([300, 1, 257, 97, 700], 4, 2, 64, torch.float16),  # q tiles and key tiles past segment ends; spare slots
        ([0, 800, 0], 2, 2, 128, torch.bfloat16),  # many key tiles; empty segments at both ends
        ([203, 129, 300, 700, 65], 8, 1, 80, torch.float16),  # head dim 80: two q, k, v descriptors (64 + 16); GQA 8
        ([130, 400], 2, 1, 96, torch.bfloat16),  # 96 = 64 + 32
    ],
)
def test_ws_matches_fp64(ws_launches, lens, hq, hkv, d, dtype):
    assert attention.path(max(lens), sum(lens), len(lens)) == "segments"
    check(lens, hq, hkv, d, dtype)
    assert ws_launches == [("fwd", "segments", True), ("dkdv", "segments", False), ("dq", "segments", True)]


def test_ws_keeps_packed_tiles_plain(ws_launches):
    """A mixed batch: its long segments take the warp-specialized forward and dq, its packed short ones the plain
    kernels."""
    lens = [1, 7, 63, 64, 65, 200, 3, 130, 64, 16]
    assert attention.path(max(lens), sum(lens), len(lens)) == "mixed"
    check(lens, 4, 2, 64, torch.float16)
    assert [ws for *_, ws in ws_launches] == [True, False, False, False, True, False]  # fwd, dk/dv, dq; segments first


def test_ws_needs_16_bit_inputs_and_tma(ws_launches):
    """fp32 keeps its exact small-tile kernels; a masked head-dim tail (40) cannot have TMA descriptors (a
    16-column tile would read the next head), so the plain kernels run (as where q or do has no descriptor,
    `_tma_ok`)."""
    check([300, 500], 2, 1, 64, torch.float32)
    check([300, 500], 2, 1, 40, torch.float16)
    assert len(ws_launches) == 6 and not any(ws for *_, ws in ws_launches)


def test_ws_with_the_fused_dq(ws_launches, monkeypatch):
    """MOCA_FUSED_DQ=1 too: dk/dv adds dq with atomics and no dq kernel runs, so only the forward is
    warp-specialized."""
    monkeypatch.setenv("MOCA_FUSED_DQ", "1")
    check([300, 1, 257, 97, 700], 4, 2, 64, torch.float16)
    assert ws_launches == [("fwd", "segments", True), ("dkdv", "segments", False)]


def test_ws_follows_the_shipped_table_per_kernel(monkeypatch):
    """On a GPU that has it (faked here: the decision only), tuned.WARP_SPECIALIZE decides per kernel, MOCA_WS=1 / 0
    forces both, fp32 and the autotuning path never run it."""
    monkeypatch.setattr(attention, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(attention, "ws_available", lambda device: True)
    monkeypatch.setattr(attention, "_arch", lambda index: "sm90")
    monkeypatch.setitem(tuned.WARP_SPECIALIZE, "sm90", {"fwd": True, "dq": False})
    monkeypatch.delenv("MOCA_WS", raising=False)
    gpu = torch.device("cuda", 0)
    assert attention._ws("fwd", gpu, torch.bfloat16) and not attention._ws("dq", gpu, torch.bfloat16)
    assert not attention._ws("fwd", gpu, torch.float32)
    monkeypatch.setenv("MOCA_WS", "1")
    assert attention._ws("dq", gpu, torch.float16)
    monkeypatch.setenv("MOCA_AUTOTUNE", "1")
    assert not attention._ws("fwd", gpu, torch.bfloat16)
    monkeypatch.setenv("MOCA_AUTOTUNE", "0")
    monkeypatch.setenv("MOCA_WS", "0")
    assert not attention._ws("fwd", gpu, torch.bfloat16)


def test_ws_segments_do_not_leak(ws_launches):
    """A q tile running past its segment's end loads the next segment's queries through its descriptor: they must
    not reach any stored row."""
    assert_segments_do_not_leak([200, 345, 290], torch.float16)
    assert ws_launches == [("fwd", "segments", True)] * 2


# ----------------------------------------------------------------------------- fused dq (atomics in dk/dv)


@pytest.fixture
def fused_dq(monkeypatch):
    """MOCA_FUSED_DQ=1 (as a benchmark or tuned.FUSED_DQ asks): the dk/dv kernel adds dq with atomics.
    Records the backward kernels launched."""
    monkeypatch.setenv("MOCA_FUSED_DQ", "1")
    calls = []

    def spy(name, *args, **kwargs):
        if name != "fwd":
            calls.append(name)
        return run(name, *args, **kwargs)

    run = attention._run
    monkeypatch.setattr(attention, "_run", spy)
    return calls


@pytest.mark.parametrize(
    "lens, hq, hkv, d, dtype, kernels, tma",
    [
        (MIXED, 2, 2, 64, torch.float16, "mixed", False),
        ([300, 1, 257, 97, 700], 4, 2, 80, torch.float16, "segments", False),  # several key tiles add to each row
        ([300, 1, 257, 97, 700], 2, 1, 128, torch.float16, "segments", True),  # TMA tiles read past segment ends
        ([1, 7, 63, 64, 2, 30, 64], 8, 1, 64, torch.float16, "packed", False),  # GQA 8: 8 heads' dq per program
        ([1, 7, 63, 64, 2, 30, 64], 4, 2, 80, torch.bfloat16, "packed", True),
        ([33, 1, 70], 4, 2, 96, torch.float16, "mixed", False),
        ([9, 70, 3], 2, 1, 40, torch.float16, "mixed", False),  # masked head-dim tail
        ([0, 5, 0, 40, 0], 2, 1, 128, torch.float16, "packed", False),  # empty segments
    ],
)
def test_fused_dq_matches_fp64(fused_dq, monkeypatch, lens, hq, hkv, d, dtype, kernels, tma):
    monkeypatch.setenv("MOCA_TMA", "1" if tma else "0")
    assert attention.path(max(lens), sum(lens), len(lens)) == kernels
    check(lens, hq, hkv, d, dtype)
    assert fused_dq == ["dkdv"] * (2 if kernels == "mixed" else 1)  # no dq kernel


def test_fused_dq_leaves_fp32_to_the_dq_kernel(fused_dq):
    check([9, 70, 3], 2, 1, 64, torch.float32)
    assert fused_dq == ["dkdv", "dkdv", "dq", "dq"]  # a mixed batch: both tilings, each with its dq kernel


def test_schedule_runs_every_tile_once():
    """The per-segment kernels' slot table: each tile of each launched segment exactly once, nothing for
    spare slots or for the short segments left to the packed kernel (a tile run twice would add its dq twice)."""
    lens = [0, 3, 200, 64, 65, 1, 130, 2]
    block, T = 64, sum(lens)
    for skip_short in (False, True):
        n = attention._n_slots(T, len(lens), block)
        sched = torch.empty(n, 2, dtype=torch.int32)
        attention._fill_schedule(sched, cu_of(lens), T, block, skip_short)
        ran = sorted((seg, tile) for seg, tile in sched.tolist() if tile * block < lens[seg])
        launched = [i for i, n in enumerate(lens) if not (skip_short and n <= tuned.PACKED_MAX_SEQLEN)]
        assert ran == sorted((i, t) for i in launched for t in range(-(-lens[i] // block)))


@pytest.mark.parametrize("fused, tma", [("0", "0"), ("1", "1")])
def test_autotune_path_matches_fp64(monkeypatch, fused, tma):
    """MOCA_AUTOTUNE=1 end to end through the interpreter: Triton's autotuner runs every candidate (its timing
    replaced by one plain run, no CUDA here) through the config pre-hooks (slot table, descriptor tiles) and,
    with the fused dq, the restore of dq between runs (without it, the 3 timing runs' dq would add up), then
    launches the winner; outputs and gradients against float64, per-segment and packed tiles."""
    monkeypatch.setenv("MOCA_FUSED_DQ", fused)
    monkeypatch.setenv("MOCA_TMA", tma)
    monkeypatch.setattr(attention, "autotune_enabled", lambda: True)
    monkeypatch.setattr(attention, "SPACES", {"fwd": [(64, 32, 4), (32, 32, 4), (32, 16, 4)],
                                              "dkdv": [(32, 64, 4), (32, 32, 4), (16, 32, 4)],
                                              "dq": [(64, 32, 4), (32, 32, 4), (32, 16, 4)]})
    monkeypatch.setattr(attention, "STAGES", (1,))
    timed = []

    def one_run(kernel_call, quantiles):
        kernel_call()
        timed.append(1)
        return [float(len(timed) % 3)] * 3  # the winner: not the first candidate

    tuners = attention._autotuner

    def fake_timing(*key):
        tuner = tuners(*key)
        tuner._do_bench = one_run
        return tuner

    attention._autotuner.cache_clear()
    monkeypatch.setattr(attention, "_autotuner", fake_timing)
    try:
        lens = [*MIXED, 16, 33]
        assert attention.path(max(lens), sum(lens), len(lens)) == "mixed"  # both tilings' autotuners
        check(lens, 4, 2, 64, torch.float16)
    finally:
        tuners.cache_clear()
    assert len(timed) == 3 * (4 if fused == "1" else 6)  # 3 candidates x (fwd, dk/dv[, dq]) x 2 tilings


def test_autotuner_restores_dq_only_when_fused():
    """MOCA_AUTOTUNE=1's dk/dv: with the fused dq, each timing run's atomics into DQ are undone; without,
    DQ is None and must not be touched (Triton 3.6, the GPU image's, cloned every restore_value argument)."""
    attention._autotuner.cache_clear()
    plain = attention._autotuner("dkdv", "segments", False)
    plain.pre_hook({"DQ": None})
    plain.post_hook({"DQ": None}, exception=None)
    dq = torch.arange(6.0)
    fused = attention._autotuner("dkdv", "segments", True)
    fused.pre_hook({"DQ": dq})
    dq.add_(1.0)  # what a timed launch adds
    fused.post_hook({"DQ": dq}, exception=None)
    assert torch.equal(dq, torch.arange(6.0))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "hq, hkv, d, dtype",
    [
        (4, 4, 64, torch.bfloat16),
        (16, 16, 80, torch.bfloat16),  # the vision tower
        (4, 2, 96, torch.bfloat16),
        (16, 2, 128, torch.bfloat16),  # 3B decoder
        (28, 4, 128, torch.bfloat16),  # 7B decoder, GQA 7
        (8, 1, 128, torch.float16),
        (4, 2, 80, torch.float32),
    ],
)
def test_gpu_matches_fp64(hq, hkv, d, dtype):
    check([*MIXED, 1000, 16, 33, 600], hq, hkv, d, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 128])
def test_gpu_packed_tiles(all_packed, d):
    """Short segments on the packed kernels with the shipped sm90 configs: awkward mixes and 1000 tiny ones."""
    for lens in (AWKWARD * 20, torch.randint(1, 9, (1000,)).tolist()):
        check(lens, 16, 2, d, torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_gpu_vision_windows_and_full_blocks():
    """Vision tower: windows of 64 patches, then the same tokens as whole images (full blocks)."""
    images = [1024, 256, 576]
    windows = [64] * (sum(images) // 64)
    for lens in (windows, images):
        check(lens, 16, 16, 80, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[4096, 4096], [32768, *[16] * 64, 1000]])
def test_gpu_long_segments(lens):
    """Too long for a dense oracle: the fp32 reference (per-segment SDPA) is the truth here; k/v
    heads are repeated for the reference so that SDPA keeps a memory-efficient kernel."""
    hq, hkv, d, dtype = 16, 2, 128, torch.bfloat16
    q, k, v, cu, max_len = make_inputs(lens, hq, hkv, d, dtype, "cuda")
    do = torch.randn(q.shape, device="cuda", dtype=dtype)

    def reference(a, b, c):
        g = hq // hkv
        return varlen_attention_torch(a, b.repeat_interleave(g, 1), c.repeat_interleave(g, 1), cu, max_len)

    ours = fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu, max_len), q, k, v, do)
    ref = fwd_bwd(reference, q, k, v, do)
    truth = fwd_bwd(reference, q.float(), k.float(), v.float(), do)
    truth = [t.double() for t in truth]
    for name, e_ours, e_ref in zip(("out", "dq", "dk", "dv"), errors(ours, truth), errors(ref, truth)):
        assert e_ours <= 2 * e_ref + TOL[dtype], f"{name}: ours {e_ours:.3g} vs reference {e_ref:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 128])
def test_gpu_tma(tma_launches, d):
    """The TMA variant on the GPU (what MOCA_TMA=1 benchmarks): per-segment, packed and mixed batches,
    and k/v as strided views of a fused qkv projection (row stride > heads x head dim)."""
    for lens in ([*MIXED, 1000, 16, 33, 600], AWKWARD * 20, [*AWKWARD, 300, 2, 700] * 4):
        check(lens, 16, 2, d, torch.bfloat16, device="cuda")
    T, hq, hkv = 1300, 16, 2
    cu = cu_of([300, 1000], "cuda")
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(T, hq, d, device="cuda", dtype=torch.float64)

    def out_and_grad(fn, x):  # attention over q, k, v as strided column views of one fused projection
        x = x.detach().requires_grad_()
        q, k, v = (y.unflatten(1, (-1, d)) for y in x.split([hq * d, hkv * d, hkv * d], dim=-1))
        assert k.stride(0) == (hq + 2 * hkv) * d  # rows wider than the heads: the descriptors' row stride
        o = fn(q, k, v)
        return o.detach(), torch.autograd.grad(o, x, g.to(o.dtype))[0]

    ours = out_and_grad(lambda q, k, v: varlen_attention(q, k, v, cu, 1000), qkv)
    ref = out_and_grad(lambda q, k, v: varlen_attention_torch(q, k, v, cu, 1000), qkv)
    truth = out_and_grad(lambda q, k, v: dense_fp64(q, k, v, cu), qkv.double())
    for name, e_ours, e_ref in zip(("out", "d_qkv"), errors(ours, truth), errors(ref, truth)):
        assert e_ours <= 2 * e_ref + TOL[torch.bfloat16], f"{name}: ours {e_ours:.3g} vs reference {e_ref:.3g}"
    assert all(tma_launches)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 128])
def test_gpu_ws(ws_launches, d):
    """The warp-specialized forward and dq on the GPU (what MOCA_WS=1 benchmarks as ours_ws), compiled by Triton's
    warp specialization with their own tiles: per-segment (a 4096-token segment: 32+ key tiles per query tile)
    and mixed batches, GQA 8 and 1."""
    if not attention.ws_available(torch.device("cuda")):
        pytest.skip(f"no warp-specialized forward on {torch.cuda.get_device_name()} with Triton {triton.__version__}")
    for lens, hq, hkv in (([4096, *MIXED, 1000, 16, 33, 600], 16, 2), ([*AWKWARD, 300, 2, 700] * 4, 16, 16)):
        check(lens, hq, hkv, d, torch.bfloat16, device="cuda")
    assert {name for name, _, ws in ws_launches if ws} == {"fwd", "dq"}
    assert all(ws for name, tiling, ws in ws_launches if tiling == "segments" and name != "dkdv")


@pytest.mark.gpu
@pytest.mark.parametrize("d, tma", [(64, "0"), (80, "1"), (128, "0"), (128, "1")])
def test_gpu_fused_dq(fused_dq, monkeypatch, d, tma):
    """The fused dq on the GPU (what MOCA_FUSED_DQ=1 benchmarks), with its own tuned tiles: per-segment
    (a 4096-token segment: its 64 key tiles add into each of its dq rows), packed and mixed batches."""
    monkeypatch.setenv("MOCA_TMA", tma)
    for lens in ([4096, *MIXED, 1000, 16, 33, 600], AWKWARD * 20, [*AWKWARD, 300, 2, 700] * 4):
        check(lens, 16, 2, d, torch.bfloat16, device="cuda")
    assert fused_dq and "dq" not in fused_dq


@pytest.mark.gpu
@pytest.mark.parametrize("fused, tma", [("0", "0"), ("1", "1")])
def test_gpu_autotune(monkeypatch, fused, tma):
    """MOCA_AUTOTUNE=1 (the tuning path, bench/tune_attention.py): every candidate timed through the
    autotuner's hooks (slot table, descriptor tiles, dq restored between timing runs), then the winner
    gives the right answer. Two candidates per kernel keep the compiles few."""
    monkeypatch.setenv("MOCA_AUTOTUNE", "1")
    monkeypatch.setenv("MOCA_FUSED_DQ", fused)
    monkeypatch.setenv("MOCA_TMA", tma)
    monkeypatch.setattr(attention, "SPACES", {k: v[-2:] for k, v in attention.SPACES.items()})
    monkeypatch.setattr(attention, "STAGES", (2,))
    attention._autotuner.cache_clear()
    lens = [*MIXED, 1000, 16, 33, 600]
    assert attention.path(max(lens), sum(lens), len(lens)) == "mixed"  # both tilings' autotuners
    try:
        check(lens, 16, 2, 128, torch.bfloat16, device="cuda")
    finally:
        attention._autotuner.cache_clear()  # autotuners over these two candidates stay with this test


def test_head_dim_splits_into_power_of_two_tiles():
    """Every head dim is covered by a power-of-two tile plus a power-of-two tail tile (Triton's block shapes), each at
    least 16 wide, the tail smaller than the first (80 = 64 + 16, 96 = 64 + 32, 40 = 32 + 16 masked); 112 = 64 + 48
    runs on a 64-wide masked tail, so the tile rules take it as masked (their tiles for masked loads)."""
    for d in range(1, 257):
        d0, d1 = tuned.split_head_dim(d)
        for width in (d0, d1) if d1 else (d0,):
            assert width >= 16 and width & (width - 1) == 0, (d, d0, d1)
        assert d0 + d1 >= d and (d1 == 0 or (d0 < d and d1 <= d0)), (d, d0, d1)
        assert tuned.masked(d) == (d0 + d1 > d)
    assert [d for d in range(16, 129, 8) if tuned.masked(d)] == [24, 40, 56, 72, 88, 104, 112, 120]
    for arch in ("sm90", "default"):  # 112 takes the rules of 72, a masked head dim, not those of 96 or 128
        for kernel in tuned.KERNELS:
            assert tuned.rule(arch, kernel, 112, torch.bfloat16, 1024) == tuned.rule(arch, kernel, 72, torch.bfloat16, 1024)
        assert tuned.rule(arch, "fwd", 112, torch.bfloat16, 1024) != tuned.rule(arch, "fwd", 96, torch.bfloat16, 1024)
    check([9, 40], 2, 1, 112, torch.float32)


def test_bad_arguments_are_clear_errors():
    q, k = torch.randn(6, 2, 16), torch.randn(6, 1, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="Hkv and D must be >= 1"):
        varlen_attention(q, torch.randn(6, 0, 16), torch.randn(6, 0, 16), cu, 6)
    with pytest.raises(ValueError, match="Hkv and D must be >= 1"):
        varlen_attention(q[..., :0], k[..., :0], k[..., :0], cu, 6)
    with pytest.raises(TypeError, match="max_seqlen: an int"):
        varlen_attention(q, k, k, cu, None)
    wide = [torch.randn(6, h, 160, dtype=torch.float64) for h in (2, 1, 1)]
    with pytest.raises(ValueError, match="head_dim <= 128 on the Triton backend"):
        varlen_attention(*[x.float() for x in wide], cu, 6, backend="triton")
    # the default backend takes head dims past the Triton tiles' range to torch, here against float64
    out = varlen_attention(*[x.float() for x in wide], cu, 6)
    torch.testing.assert_close(out.double(), dense_fp64(*wide, cu), rtol=1e-5, atol=1e-5)
