"""Host-side batch preparation: M-RoPE positions, vision window index and rotary positions, bin packing, image patchify.

These run on CPU tensors while a batch is packed, so that nothing in the model's forward needs
`.item()` / `.tolist()` (the sizes the host needs are known before the tensors go to the device).
Each public function dispatches to the C++ op `torch.ops.moca.<name>` (csrc/) when `moca._C` is
built, and otherwise, with one warning per process, to `<name>_reference`: plain Python loops with
the same signature that are also the tests' oracle. Fake impls (data-dependent sizes through
`new_dynamic_size`) let the C++ ops be traced by torch.compile.
"""

import functools
import logging

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger("moca")

try:
    import moca._C  # noqa: F401  (registers torch.ops.moca.*)

    HAS_C = True
    _IMPORT_ERROR = None
except (ImportError, OSError) as err:
    HAS_C = False
    _IMPORT_ERROR = err
# a moca._C built before patchify_ existed: the other ops still run in C++
_HAS_PATCHIFY = HAS_C and hasattr(torch.ops.moca, "patchify_")


@functools.cache
def _warn_fallback() -> None:
    logger.warning("moca._C is not available (%s); host ops run their slow Python references", _IMPORT_ERROR)


@functools.cache
def _warn_no_patchify() -> None:
    logger.warning("moca._C was built before its patchify_ op (rebuild it: pip install --no-build-isolation -e .); "
                   "image patches run the slower NumPy reference")


# ---------------------------------------------------------------------------------------------
# Input checks shared by the references and the fake impls (the C++ ops repeat them in C++).


MAX_PATCHES = 2**31 - 1  # patches of all grids of one call: the ops index them (and cu_seqlens count them) in int32


def _check_tensor(x: Tensor, name: str, dtype: torch.dtype, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.device.type not in ("cpu", "meta"):
        raise ValueError(f"{name} must be a CPU tensor (host op), got device {x.device}")
    if x.dtype != dtype or x.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D {dtype} tensor, got {x.dtype} of shape {tuple(x.shape)}")


def _check_grid_thw(grid_thw: Tensor, merge: int, name: str = "grid_thw") -> list[list[int]]:
    """Static checks always; value checks (positive, h and w divisible by merge, at most MAX_PATCHES in all)
    only on real data."""
    _check_tensor(grid_thw, name, torch.int64, 2)
    if grid_thw.shape[1] != 3:
        raise ValueError(f"{name} must have shape (I, 3), got {tuple(grid_thw.shape)}")
    if merge < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {merge}")
    if isinstance(grid_thw, torch._subclasses.FakeTensor) or grid_thw.device.type == "meta":
        return []
    grids, total = grid_thw.tolist(), 0
    for i, (t, h, w) in enumerate(grids):
        if min(t, h, w) < 1:
            raise ValueError(f"{name}[{i}] = ({t}, {h}, {w}) must be positive")
        if h % merge or w % merge:
            raise ValueError(f"{name}[{i}] = ({t}, {h}, {w}): h and w must be divisible by spatial_merge_size {merge}")
        total += t * h * w
        if total > MAX_PATCHES:
            raise ValueError(f"{name}[{i}] = ({t}, {h}, {w}): more than {MAX_PATCHES} patches in all (int32 indexing)")
    return grids


def _check_mrope_args(input_ids, cu_seqlens, image_grid_thw, spatial_merge_size) -> list[list[int]]:
    _check_tensor(input_ids, "input_ids", torch.int64, 1)
    _check_tensor(cu_seqlens, "cu_seqlens", torch.int32, 1)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be non-empty, (B+1,)")
    return _check_grid_thw(image_grid_thw, spatial_merge_size, "image_grid_thw")


def _check_window_args(grid_thw, window_size, patch_size, spatial_merge_size) -> list[list[int]]:
    if window_size < 1 or patch_size < 1:
        raise ValueError(f"window_size and patch_size must be positive, got {window_size} and {patch_size}")
    if spatial_merge_size >= 1 and window_size // spatial_merge_size // patch_size < 1:
        raise ValueError(
            f"window_size {window_size} is smaller than patch_size * spatial_merge_size = "
            f"{patch_size * spatial_merge_size}"
        )
    return _check_grid_thw(grid_thw, spatial_merge_size)


def _check_pack_args(costs, budget, max_items) -> None:
    _check_tensor(costs, "costs", torch.int64, 1)
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if max_items < 0:
        raise ValueError(f"max_items must be >= 0 (0 = unlimited), got {max_items}")


# ---------------------------------------------------------------------------------------------
# Public API


def mrope_positions(
    input_ids: Tensor, cu_seqlens: Tensor, image_grid_thw: Tensor, image_token_id: int, spatial_merge_size: int
) -> Tensor:
    """M-RoPE position ids of a packed batch, restarting at 0 for every sample.

    input_ids: (T,) int64, all samples back to back; cu_seqlens: (B+1,) int32; image_grid_thw: (I, 3)
    int64 (t, h, w) in patch units, images in order of appearance. Returns (3, T) int64.
    Text tokens get (p, p, p). An image with llm grid (t, h//m, w//m) covers that many consecutive
    `image_token_id` tokens; token (ti, hi, wi) gets (s + ti, s + hi, s + wi) with s the current
    position, which then becomes s + max(t, h//m, w//m).
    """
    if HAS_C:
        return torch.ops.moca.mrope_positions(input_ids, cu_seqlens, image_grid_thw, image_token_id, spatial_merge_size)
    _warn_fallback()
    return mrope_positions_reference(input_ids, cu_seqlens, image_grid_thw, image_token_id, spatial_merge_size)


def vision_window_index(
    grid_thw: Tensor, window_size: int, patch_size: int, spatial_merge_size: int
) -> tuple[Tensor, Tensor]:
    """Window-attention reordering of the merged vision tokens, as transformers' get_vision_window_index.

    grid_thw: (I, 3) int64 -> (window_index (sum t*h*w/m^2,) int64, cu_window_seqlens (W+1,) int32 in
    patch units). Windows are window_size // m // patch_size merged tokens on a side; empty windows vanish.
    """
    if HAS_C:
        return torch.ops.moca.vision_window_index(grid_thw, window_size, patch_size, spatial_merge_size)
    _warn_fallback()
    return vision_window_index_reference(grid_thw, window_size, patch_size, spatial_merge_size)


def vision_positions(grid_thw: Tensor, spatial_merge_size: int) -> Tensor:
    """(sum t*h*w, 2) int64 (h, w) rotary positions per patch, block-major over m x m merge blocks,
    repeated t times (transformers' get_vision_position_ids with include_temporal=False)."""
    if HAS_C:
        return torch.ops.moca.vision_positions(grid_thw, spatial_merge_size)
    _warn_fallback()
    return vision_positions_reference(grid_thw, spatial_merge_size)


def pack_bins(costs: Tensor, budget: int, max_items: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic First-Fit-Decreasing packing of items into bins of `budget` total cost.

    costs: (N,) int64 >= 0; max_items: most items per bin (0 = unlimited). Items are taken by cost
    descending (ties by index), each into the first bin (in creation order) with room; an item over
    budget gets a bin of its own. Returns (order (N,) int64 item indices bin after bin, in insertion
    order; bin_offsets (num_bins+1,) int64): bin b holds order[bin_offsets[b]:bin_offsets[b+1]].
    """
    if HAS_C:
        return torch.ops.moca.pack_bins(costs, budget, max_items)
    _warn_fallback()
    return pack_bins_reference(costs, budget, max_items)


def patchify(pixels: np.ndarray, table: np.ndarray, patch_size: int, merge_size: int,
             temporal_patch_size: int) -> np.ndarray:
    """Normalised raw patches of a resized image, in one pass over the pixels.

    pixels: (H, W, 3) uint8, H and W multiples of patch_size * merge_size; table: (3, 256) float32, the
    normalised value of every uint8 level per channel. Returns (H/p * W/p, 3 * T * p * p) float32: rows are
    patches in merge order (each merge x merge group contiguous, groups row-major), a row laid out
    (channel, frame, p, p) with value table[c][pixel], the T frames copies of one another. The output is a
    NumPy array (NumPy asks for huge pages for large arrays; torch's allocator does not).
    """
    p, m = patch_size, merge_size
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (H, W, 3) uint8, got {pixels.dtype} of shape {pixels.shape}")
    if pixels.shape[0] % (p * m) or pixels.shape[1] % (p * m):
        raise ValueError(f"image {pixels.shape[1]}x{pixels.shape[0]} is not a multiple of {p * m}")
    if not _HAS_PATCHIFY:
        _warn_fallback() if not HAS_C else _warn_no_patchify()
        return patchify_reference(pixels, table, patch_size, merge_size, temporal_patch_size)
    gh, gw = pixels.shape[0] // p, pixels.shape[1] // p
    out = np.empty((gh * gw, 3 * temporal_patch_size * p * p), dtype=np.float32)
    # writable views for torch.from_numpy (a read-only array, as np.asarray of a PIL image is, gets copied)
    torch.ops.moca.patchify_(torch.from_numpy(np.require(pixels, requirements="CW")),
                             torch.from_numpy(np.require(table, np.float32, "CW")), torch.from_numpy(out), p, m)
    return out


# ---------------------------------------------------------------------------------------------
# Python references: the fallback when moca._C is not built, and the tests' oracle.


def patchify_reference(pixels: np.ndarray, table: np.ndarray, patch_size: int, merge_size: int,
                       temporal_patch_size: int) -> np.ndarray:
    # the patch reordering runs on the uint8 image (1 byte per value) and the table gather writes float32
    # straight into patch order, so nothing loops over patches
    p, m, tp = patch_size, merge_size, temporal_patch_size
    gh, gw = pixels.shape[0] // p, pixels.shape[1] // p
    # (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p), reordered while still uint8
    blocks = pixels.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    blocks = blocks.reshape(gh * gw, 3, p, p)
    patches = np.empty((gh * gw, 3, tp, p, p), dtype=np.float32)
    for c in range(3):
        patches[:, c] = table[c][blocks[:, c]][:, None]  # repeated over the temporal frames
    return patches.reshape(gh * gw, 3 * tp * p * p)


def mrope_positions_reference(
    input_ids: Tensor, cu_seqlens: Tensor, image_grid_thw: Tensor, image_token_id: int, spatial_merge_size: int
) -> Tensor:
    grids = _check_mrope_args(input_ids, cu_seqlens, image_grid_thw, spatial_merge_size)
    ids, cu, m = input_ids.tolist(), cu_seqlens.tolist(), spatial_merge_size
    T = len(ids)
    if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T = {T}, got {cu}")
    pos = [[0] * T for _ in range(3)]
    g = 0
    for b in range(len(cu) - 1):
        p, j, end = 0, cu[b], cu[b + 1]
        while j < end:
            if ids[j] != image_token_id:
                pos[0][j] = pos[1][j] = pos[2][j] = p
                p += 1
                j += 1
                continue
            if g == len(grids):
                raise ValueError(f"image token at {j} but all {len(grids)} grids are used (image tokens left over)")
            t, h, w = grids[g][0], grids[g][1] // m, grids[g][2] // m
            n = t * h * w
            if j + n > end:
                raise ValueError(f"image {g} ({n} tokens from index {j}) is cut by the end of sample {b} at {end}")
            for ti in range(t):
                for hi in range(h):
                    for wi in range(w):
                        if ids[j] != image_token_id:
                            raise ValueError(f"image {g} needs {n} consecutive image tokens, found {ids[j]} at {j}")
                        pos[0][j], pos[1][j], pos[2][j] = p + ti, p + hi, p + wi
                        j += 1
            p += max(t, h, w)
            g += 1
    if g != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} grids but only {g} images were found (grids left over)")
    return torch.tensor(pos, dtype=torch.int64).reshape(3, T)


def vision_window_index_reference(
    grid_thw: Tensor, window_size: int, patch_size: int, spatial_merge_size: int
) -> tuple[Tensor, Tensor]:
    grids = _check_window_args(grid_thw, window_size, patch_size, spatial_merge_size)
    m = spatial_merge_size
    ws = window_size // m // patch_size
    index, cu, base = [], [0], 0
    for t, h, w in grids:
        h, w = h // m, w // m
        # transformers pads to whole windows plus one more whenever h or w divides evenly;
        # windows left empty add nothing (its unique_consecutive drops their repeated cu value)
        for ti in range(t):
            for wh in range(h // ws + 1):
                for ww in range(w // ws + 1):
                    window = [
                        base + (ti * h + hi) * w + wi
                        for hi in range(wh * ws, min(wh * ws + ws, h))
                        for wi in range(ww * ws, min(ww * ws + ws, w))
                    ]
                    if window:
                        index += window
                        cu.append(len(index) * m * m)
        base += t * h * w
    return torch.tensor(index, dtype=torch.int64), torch.tensor(cu, dtype=torch.int32)


def vision_positions_reference(grid_thw: Tensor, spatial_merge_size: int) -> Tensor:
    grids = _check_grid_thw(grid_thw, spatial_merge_size)
    m = spatial_merge_size
    pos = []
    for t, h, w in grids:
        for _ in range(t):
            for by in range(h // m):
                for bx in range(w // m):
                    for iy in range(m):
                        for ix in range(m):
                            pos.append((by * m + iy, bx * m + ix))
    return torch.tensor(pos, dtype=torch.int64).reshape(-1, 2)


def pack_bins_reference(costs: Tensor, budget: int, max_items: int = 0) -> tuple[Tensor, Tensor]:
    # A max-tree over the bins' usable room (-1: bin full) finds the first bin with room in
    # O(log N), so this fallback stays usable for large N; the tests also check it against a
    # naive scan over all bins.
    _check_pack_args(costs, budget, max_items)
    c = costs.tolist()
    if any(x < 0 for x in c):
        raise ValueError("costs must be >= 0")
    n = len(c)
    leaves = 1
    while leaves < n:
        leaves *= 2
    tree = [-1] * (2 * leaves)
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(n), key=lambda i: -c[i]):
        cost = c[item]
        if tree[1] >= cost:
            node = 1
            while node < leaves:
                node = 2 * node if tree[2 * node] >= cost else 2 * node + 1
            b = node - leaves
        else:
            b = len(bins)
            bins.append([])
            room.append(budget)
        bins[b].append(item)
        room[b] -= cost
        full = room[b] < 0 or (max_items > 0 and len(bins[b]) >= max_items)
        node = leaves + b
        tree[node] = -1 if full else room[b]
        node //= 2
        while node >= 1:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    order = [i for items in bins for i in items]
    offsets = [0]
    for items in bins:
        offsets.append(offsets[-1] + len(items))
    return torch.tensor(order, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Fake impls: output shapes for FakeTensor / torch.compile tracing of the C++ ops.

if HAS_C:

    @torch.library.register_fake("moca::mrope_positions")
    def _(input_ids, cu_seqlens, image_grid_thw, image_token_id, spatial_merge_size):
        _check_mrope_args(input_ids, cu_seqlens, image_grid_thw, spatial_merge_size)
        return input_ids.new_empty((3, input_ids.shape[0]))

    @torch.library.register_fake("moca::vision_window_index")
    def _(grid_thw, window_size, patch_size, spatial_merge_size):
        _check_window_args(grid_thw, window_size, patch_size, spatial_merge_size)
        ctx = torch.library.get_ctx()
        num_tokens, num_bounds = ctx.new_dynamic_size(), ctx.new_dynamic_size(min=1)
        return grid_thw.new_empty((num_tokens,)), grid_thw.new_empty((num_bounds,), dtype=torch.int32)

    @torch.library.register_fake("moca::vision_positions")
    def _(grid_thw, spatial_merge_size):
        _check_grid_thw(grid_thw, spatial_merge_size)
        return grid_thw.new_empty((torch.library.get_ctx().new_dynamic_size(), 2))

    @torch.library.register_fake("moca::pack_bins")
    def _(costs, budget, max_items=0):
        _check_pack_args(costs, budget, max_items)
        num_bounds = torch.library.get_ctx().new_dynamic_size(min=1)
        return costs.new_empty(costs.shape), costs.new_empty((num_bounds,))
