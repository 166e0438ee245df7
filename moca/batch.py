"""The packed batch that flows through everything, and how samples become one.

All samples lie back to back (no padding): tokens are `(T,)`, boundaries `cu_seqlens`.
Everything the forward needs to know on the host (max lengths, vision windows, image
token slots, M-RoPE positions) is computed here, on the CPU, while the batch is built,
so the model's forward never calls `.item()` or `.tolist()`.
"""

import functools
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.utils.data import get_worker_info

from moca import host_ops
from moca.config import VisionConfig


@dataclass
class Sample:
    """One processed input: token ids with expanded image pads, and its images' raw patches."""

    input_ids: torch.Tensor  # (L,) int64
    patches: torch.Tensor | None = None  # (P, 1176) float32, images in order
    grids: tuple[tuple[int, int, int], ...] = ()  # per image (t, h, w) in patch units

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)


@dataclass
class PackedBatch:
    """B samples back to back (T tokens, P raw patches of I images): what every forward takes. The int fields
    are host ints computed by `pack`, so the forward needs no `.item()`."""

    input_ids: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor  # (B+1,) int32
    max_seqlen: int
    position_ids: torch.Tensor  # (3, T) int64, M-RoPE, restarting at 0 per sample
    sample_ids: torch.Tensor  # (T,) int64, the sample each token belongs to
    lengths: torch.Tensor  # (B,) int64 tokens per sample
    image_token_index: torch.Tensor  # (N,) int64 slots of image tokens, in image order
    patches: torch.Tensor | None = None  # (P, 1176)
    grid_thw: torch.Tensor | None = None  # (I, 3) int64
    vision_cu_seqlens: torch.Tensor | None = None  # (I+1,) int32, one segment per image frame
    vision_max_seqlen: int = 0
    window_index: torch.Tensor | None = None  # (P/4,) int64 merge groups in window order
    window_reverse: torch.Tensor | None = None  # (P/4,) int64 inverse permutation
    window_cu_seqlens: torch.Tensor | None = None  # (W+1,) int32, in raw patches
    window_max_seqlen: int = 0
    vision_positions: torch.Tensor | None = None  # (P, 2) int64 (h, w) rotary positions, window order

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_images(self) -> int:
        return 0 if self.grid_thw is None else self.grid_thw.shape[0]

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """Move every tensor; the host ints stay. Pin first (`pin_memory`) for async copies."""
        moved = {
            f.name: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return replace(self, **moved)

    def pin_memory(self) -> "PackedBatch":
        return replace(
            self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        )


def host_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in a buffer that is cheap to fill and to hand on.

    In a DataLoader worker the buffer is shared memory, as torch's default_collate allocates it, so that
    sending the batch to the main process copies nothing (else pickling moves it there: ~10 ms for an
    image of 1000 tokens). Elsewhere NumPy allocates it: NumPy asks the kernel for transparent huge pages
    for large arrays (madvise) and torch's CPU allocator does not, so filling a fresh buffer of a batch's
    patches (20 MB an image of 1000 tokens) costs ~4x less time in 4 KiB page faults.
    """
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(nbytes)
    else:
        storage = torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).untyped_storage()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors) of CPU tensors into a `host_empty` buffer."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    return torch.cat(tensors, out=host_empty(shape, dtype))


def pack(samples: list[Sample], vision: VisionConfig, image_token_id: int) -> PackedBatch:
    """Concatenate CPU samples into one PackedBatch, computing the host-side metadata (M-RoPE positions,
    vision windows) with `host_ops`. ValueError for no samples, an empty sample, patches that do not match
    the grids, or image tokens that do not match the grids (`host_ops.mrope_positions`)."""
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.int64)
    if int(lengths.min()) == 0:
        raise ValueError("every sample needs at least one token")
    input_ids = torch.cat([s.input_ids for s in samples])
    cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    grids = [g for s in samples for g in s.grids]
    grid_thw = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    batch = PackedBatch(
        input_ids=input_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        position_ids=host_ops.mrope_positions(
            input_ids, cu_seqlens, grid_thw, image_token_id, vision.spatial_merge_size
        ),
        sample_ids=torch.repeat_interleave(torch.arange(len(samples)), lengths),
        lengths=lengths,
        image_token_index=(input_ids == image_token_id).nonzero().flatten(),
    )
    if not grids:
        return batch
    merge = vision.spatial_merge_size**2
    frame_lens = [h * w for t, h, w in grids for _ in range(t)]
    vision_cu = torch.zeros(len(frame_lens) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(frame_lens), 0, out=vision_cu[1:])
    window_index, window_cu = host_ops.vision_window_index(
        grid_thw, vision.window_size, vision.patch_size, vision.spatial_merge_size
    )
    positions = host_ops.vision_positions(grid_thw, vision.spatial_merge_size)
    positions = positions.view(-1, merge, 2)[window_index].view(-1, 2)
    patches = cat_rows([s.patches for s in samples if s.grids])
    if patches.shape[0] != positions.shape[0]:
        raise ValueError(f"patches ({patches.shape[0]}) do not match the image grids ({positions.shape[0]})")
    return replace(
        batch,
        patches=patches,
        grid_thw=grid_thw,
        vision_cu_seqlens=vision_cu,
        vision_max_seqlen=max(frame_lens),
        window_index=window_index,
        window_reverse=torch.argsort(window_index),
        window_cu_seqlens=window_cu,
        window_max_seqlen=int((window_cu[1:] - window_cu[:-1]).max()),
        vision_positions=positions,
    )
