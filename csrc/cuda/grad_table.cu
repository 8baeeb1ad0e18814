// The device table of per-row grad addresses, and its cache.
//
// [note: grad table cache] Autograd usually hands back the same grad tensors step after
// step (AccumulateGrad reuses .grad; a caching allocator tends to return the same
// blocks), so the table rarely changes. Each call still builds the host words (a few
// int64 per row, no device access) and compares them with the last upload for the same
// segments tensor; only a difference costs an upload, which goes from pinned memory,
// asynchronously on the current stream, into a fresh device tensor. A fresh tensor
// means a kernel still reading the old table is never overwritten, and copy_ records
// the pinned source with the caching host allocator so it outlives the copy.
#include "row_walk.cuh"

#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include <cstring>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

namespace fusedopt {
namespace cuda {
namespace {

// Enough for every live flat buffer of a run (one per param group, device and dtype);
// beyond it the least recently used table is dropped and rebuilt when next needed.
constexpr size_t kMaxCachedTables = 64;

struct CachedTable {
  int device;
  const void* segments;
  std::vector<int64_t> words;
  at::Tensor table;
  std::vector<c10::cuda::CUDAStream> streams;  // streams the table was used on
};

class GradTableCache {
 public:
  at::Tensor get(const at::Tensor& segments, std::vector<int64_t>&& words) {
    const int device = segments.get_device();
    const auto stream = at::cuda::getCurrentCUDAStream(device);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.begin();
    while (it != entries_.end() && !(it->device == device && it->segments == segments.data_ptr())) ++it;
    if (it != entries_.end()) {
      entries_.splice(entries_.begin(), entries_, it);  // most recently used first
      CachedTable& entry = entries_.front();
      if (entry.words == words) {
        mark_used_on(entry, stream);
        return entry.table;
      }
      entry.words = std::move(words);
      entry.table = upload(entry.words, segments.device());
      entry.streams = {stream};
      return entry.table;
    }
    at::Tensor table = upload(words, segments.device());
    entries_.push_front({device, segments.data_ptr(), std::move(words), table, {stream}});
    if (entries_.size() > kMaxCachedTables) entries_.pop_back();
    return table;
  }

 private:
  static at::Tensor upload(const std::vector<int64_t>& words, const at::Device& device) {
    at::Tensor pinned = at::empty({static_cast<int64_t>(words.size())},
                                  at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(pinned.data_ptr<int64_t>(), words.data(), words.size() * sizeof(int64_t));
    return pinned.to(device, at::kLong, /*non_blocking=*/true);
  }

  // A table made on one stream and read on another must not be handed out again by the
  // caching allocator before that other stream is done with it.
  static void mark_used_on(CachedTable& entry, const c10::cuda::CUDAStream& stream) {
    for (const auto& seen : entry.streams)
      if (seen == stream) return;
    c10::cuda::CUDACachingAllocator::recordStream(entry.table.storage().data_ptr(), stream);
    entry.streams.push_back(stream);
  }

  std::mutex mutex_;
  std::list<CachedTable> entries_;
};

GradTableCache& grad_table_cache() {
  // Leaked on purpose: destroying CUDA tensors during static destruction can run after
  // the CUDA runtime has shut down.
  static GradTableCache* cache = new GradTableCache();
  return *cache;
}

// Appends the grad's shape to `words` with size-1 dims dropped and mergeable dims
// merged (a transposed matrix stays 2-D, a permuted 4-D tensor often becomes 2-D or
// 3-D), so the kernel divides as little as possible. Returns the shape's word index, or
// -1 when the grad is contiguous after all.
int64_t append_shape(const at::Tensor& grad, std::vector<int64_t>& words) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  for (int64_t d = 0; d < grad.dim(); ++d) {
    const int64_t size = grad.size(d), stride = grad.stride(d);
    if (size == 1) continue;
    if (!dims.empty() && dims.back().second == stride * size) {
      dims.back() = {dims.back().first * size, stride};
    } else {
      dims.emplace_back(size, stride);
    }
  }
  if (dims.empty() || (dims.size() == 1 && dims[0].second == 1)) return -1;
  const int64_t index = static_cast<int64_t>(words.size());
  words.push_back(static_cast<int64_t>(dims.size()));
  for (const auto& dim : dims) words.push_back(dim.first);
  for (const auto& dim : dims) words.push_back(dim.second);
  return index;
}

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

}  // namespace

GradsPlan plan_grads(at::TensorList grads, const at::Tensor& segments, int64_t flat_numel,
                     bool zero_grads) {
  const int64_t num_segments = segments.size(0);
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(!grads[i].is_sparse(), "fusedopt: sparse gradients are not supported");
    TORCH_CHECK(grads[i].device() == segments.device(), "fusedopt: grad ", i, " is on ",
                grads[i].device(), " but segments are on ", segments.device());
    // Overlapping elements (expanded grads) would be zeroed by one thread while another
    // still has to read them.
    TORCH_CHECK(!zero_grads || at::has_internal_overlap(grads[i]) != at::MemOverlap::Yes,
                "fusedopt: zero_grads needs grads without overlapping elements (grad ", i,
                " is expanded)");
  }
  // One grad is the flat grad buffer when there are several rows, or when it is laid
  // out like the param buffer (contiguous, it then reads the same as the own grad of a
  // row covering the whole buffer). Any other single grad goes through the table, where
  // the kernel tells a flat buffer from the row's own grad by numel (for_each_owned_row).
  const bool flat = grads.size() == 1 &&
                    (num_segments != 1 ||
                     (flat_numel >= 0 && grads[0].numel() == flat_numel && grads[0].is_contiguous()));
  GradsPlan plan;
  plan.walk.segments = segments.data_ptr<int64_t>();
  plan.walk.num_segments = num_segments;
  if (flat) {
    TORCH_CHECK(grads[0].is_contiguous(), "fusedopt: a flat grad buffer must be contiguous");
    TORCH_CHECK(flat_numel < 0 || grads[0].numel() == flat_numel, "fusedopt: the flat grad buffer has ",
                grads[0].numel(), " elements, the param buffer ", flat_numel);
    plan.walk.space = grads[0].numel();
    plan.walk.table = nullptr;
    plan.walk.flat_grad = grads[0].data_ptr();
    return plan;
  }
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == num_segments,
              "fusedopt: expected one flat grad buffer or one grad per segment, got ", grads.size(),
              " grads for ", num_segments, " segments");
  const int64_t rows_begin = num_segments + 1;
  std::vector<int64_t> words(rows_begin + kRowWords * num_segments);
  int64_t packed = 0;
  for (int64_t r = 0; r < num_segments; ++r) {
    const at::Tensor& grad = grads[r];
    words[r] = packed;
    packed += round_up(grad.numel(), kRowPad);
    int64_t* row = words.data() + rows_begin + kRowWords * r;
    row[0] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(grad.data_ptr()));
    row[1] = grad.numel();
    // `row` may move while appending, so the shape index is stored afterwards.
    const int64_t shape = grad.is_contiguous() ? -1 : append_shape(grad, words);
    words[rows_begin + kRowWords * r + 2] = shape;
  }
  words[num_segments] = packed;
  plan.walk.space = packed;
  plan.table = grad_table_cache().get(segments, std::move(words));
  plan.walk.table = plan.table.data_ptr<int64_t>();
  plan.walk.flat_grad = nullptr;
  return plan;
}

}  // namespace cuda
}  // namespace fusedopt
