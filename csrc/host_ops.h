// Host-side (CPU) ops of moca._C that prepare a packed batch: M-RoPE positions, vision window
// index and rotary positions, token-budget bin packing; and image patchify. Registered as torch.ops.moca.* in
// registration.cpp; Python API, fake impls and reference loops live in moca/host_ops.py.
// Bad inputs raise c10::ValueError (Python ValueError) through TORCH_CHECK_VALUE.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace moca {

// input_ids (T,) int64, cu_seqlens (B+1,) int32, image_grid_thw (I, 3) int64 in patch units
// -> (3, T) int64 (t, h, w) positions restarting at 0 for every sample.
at::Tensor mrope_positions(const at::Tensor& input_ids, const at::Tensor& cu_seqlens,
                           const at::Tensor& image_grid_thw, int64_t image_token_id,
                           int64_t spatial_merge_size);

// grid_thw (I, 3) int64 -> (window_index (sum t*h*w/m^2,) int64, cu_window_seqlens (W+1,) int32),
// as transformers.vision_utils.get_vision_window_index.
std::tuple<at::Tensor, at::Tensor> vision_window_index(const at::Tensor& grid_thw, int64_t window_size,
                                                       int64_t patch_size, int64_t spatial_merge_size);

// grid_thw (I, 3) int64 -> (sum t*h*w, 2) int64 (h, w) patch positions, merge-block-major,
// as transformers.vision_utils.get_vision_position_ids(include_temporal=False).
at::Tensor vision_positions(const at::Tensor& grid_thw, int64_t spatial_merge_size);

// costs (N,) int64 -> (order (N,) int64, bin_offsets (num_bins+1,) int64): First-Fit-Decreasing.
std::tuple<at::Tensor, at::Tensor> pack_bins(const at::Tensor& costs, int64_t budget, int64_t max_items);

// pixels (H, W, 3) uint8, H and W multiples of patch*merge, table (3, 256) float32 -> out (H/p * W/p, 3*T*p*p)
// float32: row k is patch k in merge order, laid out (channel, frame, p, p), value table[c][pixel].
void patchify_(const at::Tensor& pixels, const at::Tensor& table, at::Tensor& out, int64_t patch_size,
               int64_t merge_size);

}  // namespace moca
