// The device table of per-row grad and param addresses, and its cache.
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
  bool with_params;  // a step's table (grad_norm's for the same rows has no params)
  std::vector<int64_t> words;
  at::Tensor table;
  std::vector<c10::cuda::CUDAStream> streams;  // streams the table was used on
};

class GradTableCache {
 public:
  at::Tensor get(const at::Tensor& segments, bool with_params, std::vector<int64_t>&& words) {
    const int device = segments.get_device();
    const auto stream = at::cuda::getCurrentCUDAStream(device);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.begin();
    while (it != entries_.end() &&
           !(it->device == device && it->segments == segments.data_ptr() && it->with_params == with_params))
      ++it;
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
    entries_.push_front({device, segments.data_ptr(), with_params, std::move(words), table, {stream}});
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

}  // namespace

GradsPlan plan_rows(at::TensorList params, at::TensorList grads, const at::Tensor& segments, bool zero_grads) {
  RowTable rows = build_row_table(params, grads, segments, zero_grads);
  if (rows.words.empty()) return {rows.walk_at(nullptr), at::Tensor()};
  at::Tensor table = grad_table_cache().get(segments, !params.empty(), std::move(rows.words));
  return {rows.walk_at(table.data_ptr<int64_t>()), table};
}

}  // namespace cuda
}  // namespace fusedopt
