// Token-budget bin packing of samples into micro-batches: First-Fit-Decreasing in O(N log N).
// "First open bin with room" is a leftmost-leaf query on a max-tree over the bins' usable room
// (-1 once a bin is over budget or holds max_items): O(log bins) per item instead of a scan over all bins.
#include "host_ops.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace moca {

std::tuple<at::Tensor, at::Tensor> pack_bins(const at::Tensor& costs, int64_t budget, int64_t max_items) {
  TORCH_CHECK_VALUE(costs.device().is_cpu(), "costs must be a CPU tensor");
  TORCH_CHECK_VALUE(costs.scalar_type() == at::kLong && costs.dim() == 1, "costs must be a 1-D int64 tensor, got ",
                    costs.scalar_type(), " ", costs.sizes());
  TORCH_CHECK_VALUE(budget > 0, "budget must be positive, got ", budget);
  TORCH_CHECK_VALUE(max_items >= 0, "max_items must be >= 0 (0 = unlimited), got ", max_items);
  const at::Tensor c_t = costs.contiguous();
  const int64_t* c = c_t.data_ptr<int64_t>();
  const int64_t N = c_t.numel();
  for (int64_t i = 0; i < N; ++i) TORCH_CHECK_VALUE(c[i] >= 0, "costs must be >= 0, got ", c[i], " at index ", i);

  // (-cost, index) keys are unique, so a plain sort gives cost descending, ties by index ascending.
  std::vector<std::pair<int64_t, int64_t>> keys(N);
  for (int64_t i = 0; i < N; ++i) keys[i] = {-c[i], i};
  std::sort(keys.begin(), keys.end());
  std::vector<int64_t> sorted(N);
  for (int64_t i = 0; i < N; ++i) sorted[i] = keys[i].second;
  keys = {};

  // tree[leaves + b] = usable room of bin b; sized by the bins so far (doubled when full) so that it
  // stays in cache when bins are much fewer than items.
  int64_t leaves = 1;
  std::vector<int64_t> tree(2, -1);
  std::vector<int64_t> room, count, bin_of(N);
  const auto usable = [&](int64_t b) {
    return (room[b] < 0 || (max_items > 0 && count[b] >= max_items)) ? int64_t{-1} : room[b];
  };
  for (const int64_t item : sorted) {
    const int64_t cost = c[item];
    int64_t b;
    if (tree[1] >= cost) {
      int64_t node = 1;
      while (node < leaves) node = tree[2 * node] >= cost ? 2 * node : 2 * node + 1;
      b = node - leaves;
    } else {
      b = static_cast<int64_t>(room.size());
      room.push_back(budget);
      count.push_back(0);
      if (b == leaves) {
        leaves *= 2;
        tree.assign(2 * leaves, -1);
        for (int64_t i = 0; i < b; ++i) tree[leaves + i] = usable(i);
        for (int64_t node = leaves - 1; node >= 1; --node) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
      }
    }
    room[b] -= cost;
    ++count[b];
    bin_of[item] = b;
    int64_t node = leaves + b;
    tree[node] = usable(b);
    for (node >>= 1; node >= 1; node >>= 1) {
      const int64_t best = std::max(tree[2 * node], tree[2 * node + 1]);
      if (tree[node] == best) break;  // ancestors unchanged
      tree[node] = best;
    }
  }

  const int64_t num_bins = static_cast<int64_t>(room.size());
  at::Tensor bin_offsets = at::empty({num_bins + 1}, costs.options());
  int64_t* off = bin_offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t b = 0; b < num_bins; ++b) off[b + 1] = off[b] + count[b];
  std::vector<int64_t> cursor(off, off + num_bins);
  at::Tensor order = at::empty({N}, costs.options());
  int64_t* ord = order.data_ptr<int64_t>();
  for (const int64_t item : sorted) ord[cursor[bin_of[item]]++] = item;  // insertion order within a bin
  return {order, bin_offsets};
}

}  // namespace moca
