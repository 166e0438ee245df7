"""Host ops (moca.host_ops): the C++ ops and the Python references, each against independent oracles
(transformers' Qwen2.5-VL rope index and vision_utils, hand-computed positions, a naive O(N * bins)
First-Fit-Decreasing), plus input validation, the fallback path and the fake impls."""

import functools
import logging
import random
import types

import pytest
import torch

from moca import host_ops as H

IMAGE = 151655  # <|image_pad|>

needs_c = pytest.mark.skipif(not H.HAS_C, reason="moca._C is not built")
IMPLS = [pytest.param("cpp", marks=needs_c), "reference"]


@pytest.fixture(params=IMPLS)
def ops(request):
    if request.param == "cpp":
        o = torch.ops.moca
        return types.SimpleNamespace(
            mrope_positions=o.mrope_positions,
            vision_window_index=o.vision_window_index,
            vision_positions=o.vision_positions,
            pack_bins=o.pack_bins,
        )
    return types.SimpleNamespace(
        mrope_positions=H.mrope_positions_reference,
        vision_window_index=H.vision_window_index_reference,
        vision_positions=H.vision_positions_reference,
        pack_bins=H.pack_bins_reference,
    )


# ---------------------------------------------------------------------------------------------
# M-RoPE positions


def random_sample(rng, m, t_max, adjacent_images):
    """One sample as (ids, grids): text runs and images in random order; with adjacent_images=False a
    text token separates consecutive images (as <|vision_end|><|vision_start|> do in real inputs)."""
    ids, grids, last_was_image = [], [], False
    for _ in range(rng.randint(1, 5)):
        if rng.random() < 0.5:
            ids += [rng.randrange(1000) for _ in range(rng.choice([1, 2, 3, 7, 13]))]
            last_was_image = False
        else:
            if last_was_image and not adjacent_images:
                ids.append(rng.randrange(1000))
            t = rng.randint(1, t_max)
            h, w = m * rng.randint(1, 7), m * rng.randint(1, 7)
            grids.append([t, h, w])
            ids += [IMAGE] * (t * (h // m) * (w // m))
            last_was_image = True
    return ids, grids


def pack_samples(samples):
    ids = [i for s, _ in samples for i in s]
    cu = [0]
    for s, _ in samples:
        cu.append(cu[-1] + len(s))
    grids = [g for _, gs in samples for g in gs]
    return (
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(cu, dtype=torch.int32),
        torch.tensor(grids, dtype=torch.int64).reshape(-1, 3),
    )


def edge_samples(m):
    img = lambda h, w, t=1: ([IMAGE] * (t * (h // m) * (w // m)), [[t, h, w]])  # noqa: E731
    cat = lambda *parts: (sum((p[0] for p in parts), []), sum((p[1] for p in parts), []))  # noqa: E731
    text = lambda n: ([7 + i for i in range(n)], [])  # noqa: E731
    return [
        text(1),  # one-token sample
        img(m, m),  # one-token image sample
        cat(img(2 * m, 3 * m), text(3)),  # image at the very start
        cat(text(2), img(5 * m, m)),  # image at the very end
        cat(text(4), img(m, 6 * m), text(1), img(3 * m, 3 * m), text(2)),
        cat(img(64, 92), text(5)) if 64 % m == 0 and 92 % m == 0 else text(5),  # a big non-square grid
    ]


@functools.cache
def hf_rope_index(m):
    """transformers' Qwen2_5_VLModel.get_rope_index on one sample, called unbound on a tiny config."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    shim = types.SimpleNamespace(
        config=Qwen2_5_VLConfig(vision_config={"spatial_merge_size": m}),
        get_vision_position_ids=functools.partial(Qwen2_5_VLModel.get_vision_position_ids, None),
    )

    def run(ids, grids):
        ids = ids[None]
        pos, _ = Qwen2_5_VLModel.get_rope_index(
            shim, ids, mm_token_type_ids=(ids == IMAGE).int(), image_grid_thw=grids if len(grids) else None
        )
        return pos[:, 0]

    return run


@pytest.mark.parametrize("m", [1, 2])
def test_mrope_matches_transformers_per_sample(ops, m):
    rng = random.Random(m)
    hf = hf_rope_index(m)
    for _ in range(6):
        samples = [random_sample(rng, m, t_max=1, adjacent_images=False) for _ in range(rng.randint(1, 5))]
        samples += rng.sample(edge_samples(m), 3)
        rng.shuffle(samples)
        ids, cu, grids = pack_samples(samples)
        pos = ops.mrope_positions(ids, cu, grids, IMAGE, m)
        assert pos.dtype == torch.int64 and pos.shape == (3, len(ids))
        g0 = 0
        for b, (s, gs) in enumerate(samples):
            lo, hi = cu[b].item(), cu[b + 1].item()
            expected = hf(ids[lo:hi], grids[g0 : g0 + len(gs)])
            torch.testing.assert_close(pos[:, lo:hi], expected, rtol=0, atol=0)
            g0 += len(gs)


def test_mrope_hand_computed(ops):
    # sample 0: 2 text, image (1, 4, 6) -> 2 x 3 tokens at start 2, then text at 2 + max(1, 2, 3) = 5
    # sample 1: text, image (2, 2, 2) -> 2 x 1 x 1 tokens at start 1, then text at 1 + max(2, 1, 1) = 3
    # sample 2: two images back to back, (1, 2, 4) then (1, 2, 2): starts 0 and 0 + 2
    ids = [1, 2] + [IMAGE] * 6 + [3] + [4] + [IMAGE] * 2 + [5] + [IMAGE] * 3
    cu = torch.tensor([0, 9, 13, 16], dtype=torch.int32)
    grids = torch.tensor([[1, 4, 6], [2, 2, 2], [1, 2, 4], [1, 2, 2]])
    expected = torch.tensor(
        [
            [0, 1, 2, 2, 2, 2, 2, 2, 5] + [0, 1, 2, 3] + [0, 0, 2],
            [0, 1, 2, 2, 2, 3, 3, 3, 5] + [0, 1, 1, 3] + [0, 0, 2],
            [0, 1, 2, 3, 4, 2, 3, 4, 5] + [0, 1, 1, 3] + [0, 1, 2],
        ]
    )
    pos = ops.mrope_positions(torch.tensor(ids), cu, grids, IMAGE, 2)
    torch.testing.assert_close(pos, expected, rtol=0, atol=0)


@needs_c
@pytest.mark.parametrize("m", [1, 2, 3])
def test_mrope_cpp_matches_reference(m):
    rng = random.Random(10 + m)
    for trial in range(30):
        samples = [
            random_sample(rng, m, t_max=3, adjacent_images=trial % 2 == 0) for _ in range(rng.randint(1, 6))
        ]
        samples += rng.sample(edge_samples(m), 2) + [([], [])]  # and an empty sample
        rng.shuffle(samples)
        ids, cu, grids = pack_samples(samples)
        want = H.mrope_positions_reference(ids, cu, grids, IMAGE, m)
        torch.testing.assert_close(torch.ops.moca.mrope_positions(ids, cu, grids, IMAGE, m), want, rtol=0, atol=0)
        torch.testing.assert_close(H.mrope_positions(ids, cu, grids, IMAGE, m), want, rtol=0, atol=0)
    # text only, I == 0, and an empty batch
    ids = torch.randint(0, 1000, (131,))
    cu = torch.tensor([0, 1, 8, 105, 131], dtype=torch.int32)
    none = torch.empty(0, 3, dtype=torch.int64)
    pos = torch.ops.moca.mrope_positions(ids, cu, none, IMAGE, m)
    torch.testing.assert_close(pos, H.mrope_positions_reference(ids, cu, none, IMAGE, m), rtol=0, atol=0)
    torch.testing.assert_close(pos[:, 8:105], torch.arange(97).expand(3, 97), rtol=0, atol=0)
    empty = torch.ops.moca.mrope_positions(ids[:0], torch.zeros(1, dtype=torch.int32), none, IMAGE, m)
    assert empty.shape == (3, 0)


# ---------------------------------------------------------------------------------------------
# Vision window index and rotary positions


def random_grids(rng, m, n):
    """n random grids (t, h, w) plus edge cases: one merge block, even window multiples, a big non-square one."""
    grids = [[rng.randint(1, 2), m * rng.randint(1, 24), m * rng.randint(1, 24)] for _ in range(n)]
    grids += [[1, m, m], [1, 2 * m, 2 * m], [1, 8 * m, 4 * m], [1, 64 // m * m, 92 // m * m]]
    return torch.tensor(grids)


@pytest.mark.parametrize(
    "window_size, patch_size, m", [(112, 14, 2), (56, 14, 2), (28, 14, 2), (84, 14, 2), (64, 8, 1)]
)
def test_window_index_matches_transformers(ops, window_size, patch_size, m):
    from transformers.vision_utils import get_vision_window_index

    rng = random.Random(window_size + m)
    for n in (1, 2, 5):
        grids = random_grids(rng, m, n)
        want_index, want_cu = get_vision_window_index(grids, m, window_size, patch_size)
        index, cu = ops.vision_window_index(grids, window_size, patch_size, m)
        assert index.dtype == torch.int64 and cu.dtype == torch.int32
        torch.testing.assert_close(index, want_index, rtol=0, atol=0)
        torch.testing.assert_close(cu, want_cu, rtol=0, atol=0)
    index, cu = ops.vision_window_index(torch.empty(0, 3, dtype=torch.int64), window_size, patch_size, m)
    assert index.shape == (0,) and cu.tolist() == [0]


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_vision_positions_matches_transformers(ops, m):
    from transformers.vision_utils import get_vision_position_ids

    rng = random.Random(m)
    for n in (1, 3, 6):
        grids = random_grids(rng, m, n)
        pos = ops.vision_positions(grids, m)
        assert pos.dtype == torch.int64
        torch.testing.assert_close(pos, get_vision_position_ids(grids, m, include_temporal=False), rtol=0, atol=0)
    assert ops.vision_positions(torch.empty(0, 3, dtype=torch.int64), m).shape == (0, 2)


@needs_c
def test_vision_public_api_uses_cpp():
    grids = torch.tensor([[1, 16, 28], [2, 6, 4]])
    for got, want in zip(H.vision_window_index(grids, 112, 14, 2), H.vision_window_index_reference(grids, 112, 14, 2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(H.vision_positions(grids, 2), H.vision_positions_reference(grids, 2), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bin packing


def naive_ffd(costs, budget, max_items):
    """First-Fit-Decreasing by scanning every bin for every item: O(N * bins)."""
    bins, sums = [], []
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        for b in range(len(bins)):
            if sums[b] + costs[i] <= budget and (max_items == 0 or len(bins[b]) < max_items):
                bins[b].append(i)
                sums[b] += costs[i]
                break
        else:
            bins.append([i])
            sums.append(costs[i])
    return bins


def unpack(order, offsets):
    order, offsets = order.tolist(), offsets.tolist()
    return [order[a:b] for a, b in zip(offsets, offsets[1:])]


def random_costs(rng, n, budget):
    kind = rng.choice(["narrow", "wide", "mixed"])
    if kind == "narrow":  # many ties
        return [rng.randint(1, 4) * budget // 8 for _ in range(n)]
    if kind == "wide":
        return [rng.randint(0, budget) for _ in range(n)]
    small, big, over = max(1, budget // 3), budget // 2, budget + 50  # zeros, small, large, over budget
    draws = lambda: [0, rng.randint(1, small), rng.randint(big, budget), rng.randint(budget + 1, over)]  # noqa: E731
    return [rng.choice(draws()) for _ in range(n)]


@pytest.mark.parametrize("n", [0, 1, 7, 97, 257, 1500])
def test_pack_bins_matches_naive_ffd(ops, n):
    rng = random.Random(n)
    for _ in range(4):
        budget = rng.choice([1, 13, 100, 12800])
        max_items = rng.choice([0, 0, 1, 3, 8])
        costs = random_costs(rng, n, budget)
        order, offsets = ops.pack_bins(torch.tensor(costs, dtype=torch.int64), budget, max_items)
        assert order.dtype == offsets.dtype == torch.int64 and order.shape == (n,)
        bins = unpack(order, offsets)
        assert bins == naive_ffd(costs, budget, max_items)
        assert sorted(order.tolist()) == list(range(n))  # every item exactly once
        for items in bins:
            assert items and (len(items) == 1 or sum(costs[i] for i in items) <= budget)
            assert max_items == 0 or len(items) <= max_items


@needs_c
def test_pack_bins_cpp_matches_reference_large_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    costs = torch.randint(1, 1281, (40_000,), generator=g)
    costs[::97] = 0
    costs[::131] = 20_000  # over budget: own bins
    want = H.pack_bins_reference(costs, 12_800, 24)
    got = H.pack_bins(costs, 12_800, 24)
    again = torch.ops.moca.pack_bins(costs.clone(), 12_800, 24)
    for a, b, c in zip(got, want, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad inputs, fallback, fake impls


def _grid(*rows):
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


_ids = torch.tensor([1, IMAGE, IMAGE, 2])
_cu = torch.tensor([0, 4], dtype=torch.int32)
BAD = {
    "ids int32": ("mrope_positions", (_ids.int(), _cu, _grid([1, 2, 4]), IMAGE, 2)),
    "ids 2-D": ("mrope_positions", (_ids[None], _cu, _grid([1, 2, 4]), IMAGE, 2)),
    "cu int64": ("mrope_positions", (_ids, _cu.long(), _grid([1, 2, 4]), IMAGE, 2)),
    "cu short of T": ("mrope_positions", (_ids, torch.tensor([0, 3], dtype=torch.int32), _grid([1, 2, 4]), IMAGE, 2)),
    "cu decreasing": (
        "mrope_positions",
        (_ids, torch.tensor([0, 3, 2, 4], dtype=torch.int32), _grid([1, 2, 4]), IMAGE, 2),
    ),
    "grid (I, 2)": ("mrope_positions", (_ids, _cu, torch.tensor([[2, 4]]), IMAGE, 2)),
    "grid float": ("mrope_positions", (_ids, _cu, _grid([1, 2, 4]).float(), IMAGE, 2)),
    "grid not divisible": ("mrope_positions", (_ids, _cu, _grid([1, 3, 4]), IMAGE, 2)),
    "grid zero": ("mrope_positions", (_ids, _cu, _grid([0, 2, 4]), IMAGE, 2)),
    "merge 0": ("mrope_positions", (_ids, _cu, _grid([1, 2, 4]), IMAGE, 0)),
    "image tokens left over": ("mrope_positions", (_ids, _cu, _grid([1, 2, 2]), IMAGE, 2)),
    "no grids for tokens": ("mrope_positions", (_ids, _cu, _grid(), IMAGE, 2)),
    "grids left over": ("mrope_positions", (_ids, _cu, _grid([1, 2, 4], [1, 2, 2]), IMAGE, 2)),
    "image cut by boundary": (
        "mrope_positions",
        (_ids, torch.tensor([0, 2, 4], dtype=torch.int32), _grid([1, 2, 4]), IMAGE, 2),
    ),
    "image too short": ("mrope_positions", (_ids, _cu, _grid([1, 2, 6]), IMAGE, 2)),
    "window < patch*merge": ("vision_window_index", (_grid([1, 4, 4]), 20, 14, 2)),
    "window grid not divisible": ("vision_window_index", (_grid([1, 4, 5]), 112, 14, 2)),
    "window grid int32": ("vision_window_index", (_grid([1, 4, 4]).int(), 112, 14, 2)),
    "positions grid not divisible": ("vision_positions", (_grid([1, 6, 4]), 4)),
    "positions grid 1-D": ("vision_positions", (torch.tensor([1, 4, 4]), 2)),
    # patch counts whose int64 products wrap (to 0 or -1): an output allocated too small, written past
    "positions grid overflows": ("vision_positions", (_grid([1, 2, 2], [2**32, 2**32, 2]), 2)),
    "window grid overflows": ("vision_window_index", (_grid([2**32, 2**32, 2]), 112, 14, 2)),
    "mrope grid overflows": ("mrope_positions", (_ids, _cu, _grid([1, 2**32 + 2, 2**32 - 2]), IMAGE, 2)),
    "more than 2^31 patches": ("vision_positions", (_grid([1, 2**16, 2**16], [1, 2, 2]), 2)),
    "costs float": ("pack_bins", (torch.rand(5), 10, 0)),
    "costs 2-D": ("pack_bins", (torch.ones(2, 2, dtype=torch.int64), 10, 0)),
    "negative cost": ("pack_bins", (torch.tensor([3, -1, 2]), 10, 0)),
    "budget 0": ("pack_bins", (torch.tensor([3, 1, 2]), 0, 0)),
    "max_items < 0": ("pack_bins", (torch.tensor([3, 1, 2]), 10, -1)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_value_error(ops, case):
    name, args = BAD[case]
    with pytest.raises(ValueError):
        getattr(ops, name)(*args)
    with pytest.raises(ValueError):
        getattr(H, name)(*args)


def test_fallback_warns_once_and_uses_reference(monkeypatch, caplog):
    monkeypatch.setattr(H, "HAS_C", False)
    H._warn_fallback.cache_clear()
    costs = torch.tensor([5, 3, 7, 2, 9, 1])
    with caplog.at_level(logging.WARNING, logger="moca"):
        order, offsets = H.pack_bins(costs, 10)
        H.vision_positions(_grid([1, 2, 2]), 2)
    assert unpack(order, offsets) == [[4, 5], [2, 1], [0, 3]]  # hand-computed FFD
    assert sum("Python reference" in r.getMessage() for r in caplog.records) == 1
    H._warn_fallback.cache_clear()


@needs_c
def test_fake_impls_opcheck():
    ids, cu, grids = pack_samples(edge_samples(2)[2:5])
    cases = [
        (torch.ops.moca.mrope_positions.default, (ids, cu, grids, IMAGE, 2)),
        (torch.ops.moca.vision_window_index.default, (grids, 112, 14, 2)),
        (torch.ops.moca.vision_positions.default, (grids, 2)),
        (torch.ops.moca.pack_bins.default, (torch.randint(0, 50, (97,)), 100, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_c
def test_torch_compile_smoke():
    def prepare(ids, cu, grids, costs):
        pos = H.mrope_positions(ids, cu, grids, IMAGE, 2)
        index, cu_windows = H.vision_window_index(grids, 112, 14, 2)
        order, offsets = H.pack_bins(costs, 100, 0)
        return pos.sum(0), index * 2, cu_windows, H.vision_positions(grids, 2) + 1, order, offsets

    ids, cu, grids = pack_samples(edge_samples(2)[2:5])
    costs = torch.randint(0, 50, (31,))
    eager = prepare(ids, cu, grids, costs)
    compiled = torch.compile(prepare, fullgraph=True, backend="aot_eager")(ids, cu, grids, costs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Image patchify


def _patchify_loops(pixels, table, p, m, tp):
    """Independent oracle: the patch rows built value by value (merge groups row-major, each m x m group's
    patches row-major, a row (channel, frame, p, p))."""
    import numpy as np

    gh, gw = pixels.shape[0] // p, pixels.shape[1] // p
    rows = []
    for bh in range(gh // m):
        for bw in range(gw // m):
            for mh in range(m):
                for mw in range(m):
                    y0, x0 = (bh * m + mh) * p, (bw * m + mw) * p
                    rows.append([table[c][pixels[y0 + i, x0 + j, c]]
                                 for c in range(3) for _ in range(tp) for i in range(p) for j in range(p)])
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("p, m, tp, gh, gw", [(14, 2, 2, 4, 6), (2, 2, 2, 6, 4), (3, 1, 1, 2, 5), (4, 3, 3, 3, 6)])
def test_patchify_cpp_and_reference_match_loops(p, m, tp, gh, gw):
    import numpy as np

    rng = np.random.default_rng(p * 100 + gh)
    pixels = rng.integers(0, 256, (gh * p, gw * p, 3), dtype=np.uint8)
    table = rng.standard_normal((3, 256)).astype(np.float32)
    want = _patchify_loops(pixels, table, p, m, tp)
    ref = H.patchify_reference(pixels, table, p, m, tp)
    assert ref.dtype == np.float32 and np.array_equal(ref.view(np.uint32), want.view(np.uint32))
    got = H.patchify(pixels, table, p, m, tp)  # the C++ op when built
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got.view(np.uint32), want.view(np.uint32))


@needs_c
def test_patchify_cpp_large_matches_reference():
    import numpy as np

    if not H._HAS_PATCHIFY:
        pytest.skip("moca._C was built before patchify_")
    pixels = np.random.default_rng(0).integers(0, 256, (54 * 14, 74 * 14, 3), dtype=np.uint8)
    pixels.flags.writeable = False  # as np.asarray of a PIL image
    table = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    want = H.patchify_reference(pixels, table, 14, 2, 2)
    assert np.array_equal(H.patchify(pixels, table, 14, 2, 2).view(np.uint32), want.view(np.uint32))


def test_patchify_bad_inputs_raise_value_error():
    import numpy as np

    table = np.zeros((3, 256), np.float32)
    with pytest.raises(ValueError):
        H.patchify(np.zeros((28, 28, 4), np.uint8), table, 14, 2, 2)  # not RGB
    with pytest.raises(ValueError):
        H.patchify(np.zeros((28, 28, 3), np.float32), table, 14, 2, 2)  # not uint8
    with pytest.raises(ValueError):
        H.patchify(np.zeros((28, 42, 3), np.uint8), table, 14, 2, 2)  # not a multiple of 28


TWO_HALVES = _grid([1, 2**15, 2**15], [1, 2**15, 2**15])  # 2^30 patches each: int32 alone, 2^31 together


@pytest.mark.parametrize("name, args", [
    ("mrope_positions", (_ids, _cu, TWO_HALVES, IMAGE, 2)),
    ("vision_window_index", (TWO_HALVES, 112, 14, 2)),
])
def test_grids_over_2_31_patches_together_are_refused_by_the_grid_check(ops, name, args):
    """Every grid fits int32 indexing, together they do not: the grid check refuses them, naming the limit (the ops
    size their outputs and int32 offsets from the total)."""
    with pytest.raises(ValueError, match="more than 2147483647 patches in all"):
        getattr(ops, name)(*args)
