// Position tensors for a packed batch: M-RoPE ids of the decoder tokens, and the vision tower's
// window index and 2-D rotary positions. Plain loops over the host copies of the grids; every
// output is written once, so each op is O(output size).
#include "host_ops.h"

#include <algorithm>
#include <limits>

namespace moca {
namespace {

// Checks grid_thw (I, 3) int64 on CPU with t, h, w >= 1, h, w divisible by merge and at most 2^31 - 1
// patches in all (so no product or sum of the ops below overflows); returns it contiguous.
at::Tensor checked_grids(const at::Tensor& grid_thw, int64_t merge, const char* name) {
  TORCH_CHECK_VALUE(merge >= 1, "spatial_merge_size must be >= 1, got ", merge);
  TORCH_CHECK_VALUE(grid_thw.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(grid_thw.scalar_type() == at::kLong, name, " must be int64, got ", grid_thw.scalar_type());
  TORCH_CHECK_VALUE(grid_thw.dim() == 2 && grid_thw.size(1) == 3, name, " must have shape (I, 3), got ",
                    grid_thw.sizes());
  at::Tensor grids = grid_thw.contiguous();
  const int64_t* g = grids.data_ptr<int64_t>();
  constexpr int64_t kMaxPatches = std::numeric_limits<int32_t>::max();
  int64_t total = 0;
  for (int64_t i = 0; i < grids.size(0); ++i) {
    const int64_t t = g[3 * i], h = g[3 * i + 1], w = g[3 * i + 2];
    TORCH_CHECK_VALUE(t >= 1 && h >= 1 && w >= 1, name, "[", i, "] = (", t, ", ", h, ", ", w,
                      ") must be positive");
    TORCH_CHECK_VALUE(h % merge == 0 && w % merge == 0, name, "[", i, "] = (", t, ", ", h, ", ", w,
                      "): h and w must be divisible by spatial_merge_size ", merge);
    // each factor is below 2^31 here, so the division-based bound holds without overflow
    TORCH_CHECK_VALUE(t <= kMaxPatches && h <= kMaxPatches / t && w <= kMaxPatches / (t * h) &&
                          t * h * w <= kMaxPatches - total,
                      name, "[", i, "] = (", t, ", ", h, ", ", w, "): more than ", kMaxPatches,
                      " patches in all (int32 indexing)");
    total += t * h * w;
  }
  return grids;
}

}  // namespace

at::Tensor mrope_positions(const at::Tensor& input_ids, const at::Tensor& cu_seqlens,
                           const at::Tensor& image_grid_thw, int64_t image_token_id,
                           int64_t spatial_merge_size) {
  TORCH_CHECK_VALUE(input_ids.device().is_cpu() && cu_seqlens.device().is_cpu(),
                    "input_ids and cu_seqlens must be CPU tensors");
  TORCH_CHECK_VALUE(input_ids.scalar_type() == at::kLong && input_ids.dim() == 1,
                    "input_ids must be a 1-D int64 tensor, got ", input_ids.scalar_type(), " ", input_ids.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
                    "cu_seqlens must be a non-empty 1-D int32 tensor, got ", cu_seqlens.scalar_type(), " ",
                    cu_seqlens.sizes());
  const at::Tensor grids = checked_grids(image_grid_thw, spatial_merge_size, "image_grid_thw");
  const at::Tensor ids_t = input_ids.contiguous();
  const at::Tensor cu_t = cu_seqlens.contiguous();
  const int64_t* ids = ids_t.data_ptr<int64_t>();
  const int32_t* cu = cu_t.data_ptr<int32_t>();
  const int64_t* g = grids.data_ptr<int64_t>();
  const int64_t T = ids_t.numel(), B = cu_t.numel() - 1, I = grids.size(0);
  TORCH_CHECK_VALUE(cu[0] == 0 && cu[B] == T, "cu_seqlens must start at 0 and end at T = ", T, ", got ", cu[0],
                    " and ", cu[B]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(cu[b] <= cu[b + 1], "cu_seqlens must be non-decreasing, got ", cu[b], " > ", cu[b + 1]);
  }

  at::Tensor out = at::empty({3, T}, input_ids.options());
  int64_t* pt = out.data_ptr<int64_t>();
  int64_t* ph = pt + T;
  int64_t* pw = pt + 2 * T;
  int64_t next_grid = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t end = cu[b + 1];
    int64_t pos = 0;
    for (int64_t j = cu[b]; j < end;) {
      if (ids[j] != image_token_id) {
        pt[j] = ph[j] = pw[j] = pos++;
        ++j;
        continue;
      }
      TORCH_CHECK_VALUE(next_grid < I, "image token at index ", j, " but all ", I,
                        " grids of image_grid_thw are used (image tokens left over)");
      const int64_t t = g[3 * next_grid], lh = g[3 * next_grid + 1] / spatial_merge_size,
                    lw = g[3 * next_grid + 2] / spatial_merge_size;
      const int64_t n = t * lh * lw;
      TORCH_CHECK_VALUE(j + n <= end, "image ", next_grid, " (", n, " tokens from index ", j,
                        ") is cut by the end of sample ", b, " at index ", end);
      for (int64_t ti = 0; ti < t; ++ti) {
        for (int64_t hi = 0; hi < lh; ++hi) {
          for (int64_t wi = 0; wi < lw; ++wi, ++j) {
            TORCH_CHECK_VALUE(ids[j] == image_token_id, "image ", next_grid, " needs ", n,
                              " consecutive image tokens, found token ", ids[j], " at index ", j);
            pt[j] = pos + ti;
            ph[j] = pos + hi;
            pw[j] = pos + wi;
          }
        }
      }
      pos += std::max({t, lh, lw});
      ++next_grid;
    }
  }
  TORCH_CHECK_VALUE(next_grid == I, "image_grid_thw has ", I, " grids but only ", next_grid,
                    " images were found in input_ids (grids left over)");
  return out;
}

std::tuple<at::Tensor, at::Tensor> vision_window_index(const at::Tensor& grid_thw, int64_t window_size,
                                                       int64_t patch_size, int64_t spatial_merge_size) {
  TORCH_CHECK_VALUE(window_size >= 1 && patch_size >= 1, "window_size and patch_size must be positive, got ",
                    window_size, " and ", patch_size);
  const at::Tensor grids = checked_grids(grid_thw, spatial_merge_size, "grid_thw");
  const int64_t ws = window_size / spatial_merge_size / patch_size;  // window side in merged tokens
  TORCH_CHECK_VALUE(ws >= 1, "window_size ", window_size, " is smaller than patch_size * spatial_merge_size = ",
                    patch_size * spatial_merge_size);
  const int64_t* g = grids.data_ptr<int64_t>();
  const int64_t I = grids.size(0), unit = spatial_merge_size * spatial_merge_size;

  int64_t total = 0;  // merged tokens
  for (int64_t i = 0; i < I; ++i) total += g[3 * i] * g[3 * i + 1] * g[3 * i + 2] / unit;
  TORCH_CHECK_VALUE(total * unit <= std::numeric_limits<int32_t>::max(), "grid_thw has ", total * unit,
                    " patches, more than int32 cu_window_seqlens can hold");

  at::Tensor index = at::empty({total}, grid_thw.options());
  int64_t* out = index.data_ptr<int64_t>();
  std::vector<int32_t> cu{0};
  int64_t k = 0, base = 0;
  for (int64_t i = 0; i < I; ++i) {
    const int64_t t = g[3 * i], lh = g[3 * i + 1] / spatial_merge_size, lw = g[3 * i + 2] / spatial_merge_size;
    // transformers pads by ws - (n % ws), a whole empty window row/column when n % ws == 0;
    // the empty windows add repeated cu values that its unique_consecutive then drops.
    const int64_t nwh = lh / ws + 1, nww = lw / ws + 1;
    for (int64_t ti = 0; ti < t; ++ti) {
      for (int64_t wh = 0; wh < nwh; ++wh) {
        for (int64_t ww = 0; ww < nww; ++ww) {
          const int64_t h0 = wh * ws, h1 = std::min(h0 + ws, lh), w0 = ww * ws, w1 = std::min(w0 + ws, lw);
          if (h0 >= h1 || w0 >= w1) continue;
          for (int64_t hi = h0; hi < h1; ++hi) {
            for (int64_t wi = w0; wi < w1; ++wi) out[k++] = base + (ti * lh + hi) * lw + wi;
          }
          cu.push_back(static_cast<int32_t>(k * unit));
        }
      }
    }
    base += t * lh * lw;
  }
  at::Tensor cu_window_seqlens = at::tensor(cu, grid_thw.options().dtype(at::kInt));
  return {index, cu_window_seqlens};
}

at::Tensor vision_positions(const at::Tensor& grid_thw, int64_t spatial_merge_size) {
  const at::Tensor grids = checked_grids(grid_thw, spatial_merge_size, "grid_thw");
  const int64_t* g = grids.data_ptr<int64_t>();
  const int64_t I = grids.size(0), m = spatial_merge_size;
  int64_t total = 0;
  for (int64_t i = 0; i < I; ++i) total += g[3 * i] * g[3 * i + 1] * g[3 * i + 2];

  at::Tensor out = at::empty({total, 2}, grid_thw.options());
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < I; ++i) {
    const int64_t t = g[3 * i], bh = g[3 * i + 1] / m, bw = g[3 * i + 2] / m;
    for (int64_t ti = 0; ti < t; ++ti) {
      for (int64_t by = 0; by < bh; ++by) {
        for (int64_t bx = 0; bx < bw; ++bx) {
          for (int64_t iy = 0; iy < m; ++iy) {
            for (int64_t ix = 0; ix < m; ++ix) {
              *p++ = by * m + iy;
              *p++ = bx * m + ix;
            }
          }
        }
      }
    }
  }
  return out;
}

}  // namespace moca
