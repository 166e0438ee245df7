// Image patchify: a resized uint8 RGB image -> normalised float32 patch rows in merge order, in one pass.
// Each output value is table[c][pixel] (moca.image's lookup table of transformers' rescale + normalise),
// written once; the temporal frames are copies of the first.
#include "host_ops.h"

#include <cstring>

namespace moca {

void patchify_(const at::Tensor& pixels, const at::Tensor& table, at::Tensor& out, int64_t patch_size,
               int64_t merge_size) {
  TORCH_CHECK_VALUE(pixels.device().is_cpu() && table.device().is_cpu() && out.device().is_cpu(),
                    "patchify_: pixels, table and out must be CPU tensors");
  TORCH_CHECK_VALUE(pixels.scalar_type() == at::kByte && pixels.dim() == 3 && pixels.size(2) == 3,
                    "pixels must be a (H, W, 3) uint8 tensor, got ", pixels.scalar_type(), " ", pixels.sizes());
  TORCH_CHECK_VALUE(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(0) == 3 &&
                        table.size(1) == 256,
                    "table must be a (3, 256) float32 tensor, got ", table.scalar_type(), " ", table.sizes());
  const int64_t p = patch_size, m = merge_size;
  TORCH_CHECK_VALUE(p >= 1 && m >= 1, "patch_size and merge_size must be positive, got ", p, " and ", m);
  const int64_t H = pixels.size(0), W = pixels.size(1);
  TORCH_CHECK_VALUE(H % (p * m) == 0 && W % (p * m) == 0, "image ", W, "x", H, " is not a multiple of ", p * m);
  const int64_t gh = H / p, gw = W / p, n = gh * gw, pp = p * p;
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == n &&
                        out.size(1) >= 3 * pp && out.size(1) % (3 * pp) == 0 && out.is_contiguous(),
                    "out must be a contiguous (", n, ", 3 * T * ", pp, ") float32 tensor, got ", out.scalar_type(),
                    " ", out.sizes());
  const int64_t tp = out.size(1) / (3 * pp), row = out.size(1);
  const at::Tensor px_t = pixels.contiguous(), table_t = table.contiguous();
  const uint8_t* px = px_t.data_ptr<uint8_t>();
  const float* lut = table_t.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t bh = 0; bh < gh / m; ++bh) {
    for (int64_t bw = 0; bw < gw / m; ++bw) {
      for (int64_t mh = 0; mh < m; ++mh) {
        for (int64_t mw = 0; mw < m; ++mw, o += row) {
          const uint8_t* src = px + ((bh * m + mh) * p * W + (bw * m + mw) * p) * 3;
          for (int64_t c = 0; c < 3; ++c) {
            float* dst = o + c * tp * pp;
            const float* t = lut + c * 256;
            for (int64_t i = 0; i < p; ++i) {
              const uint8_t* s = src + i * W * 3 + c;
              for (int64_t j = 0; j < p; ++j) dst[i * p + j] = t[s[3 * j]];
            }
            for (int64_t f = 1; f < tp; ++f) std::memcpy(dst + f * pp, dst, pp * sizeof(float));
          }
        }
      }
    }
  }
}

}  // namespace moca
