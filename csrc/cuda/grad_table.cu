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

// The per-row grad table (row_walk.cuh) of one grad per row, into `words`.
void append_grad_rows(at::TensorList grads, int64_t num_segments, std::vector<int64_t>& words) {
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == num_segments,
              "fusedopt: expected one flat grad buffer or one grad per segment, got ", grads.size(),
              " grads for ", num_segments, " segments");
  const int64_t rows_begin = num_segments + 1;
  words.assign(rows_begin + kRowWords * num_segments, 0);
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
}

}  // namespace

GradsPlan plan_rows(at::TensorList params, at::TensorList grads, const at::Tensor& segments, bool zero_grads) {
  const int64_t num_segments = segments.size(0);
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(params[i].device() == segments.device() && params[i].is_contiguous(), "fusedopt: param ", i,
                " must be a contiguous tensor on ", segments.device());
  // One param is the flat param buffer or a lone row's own (the device tells them apart,
  // row_param); one per row goes through the table.
  const bool param_rows = params.size() > 1;
  TORCH_CHECK(params.size() <= 1 || static_cast<int64_t>(params.size()) == num_segments,
              "fusedopt: expected one flat param buffer or one param per segment, got ", params.size(),
              " params for ", num_segments, " segments");
  const int64_t flat_numel = params.size() == 1 ? params[0].numel() : -1;
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
  // One grad is the flat grad buffer when there are several rows. A single grad for a
  // single row goes through the table, where the kernel tells a flat buffer from the
  // row's own grad by numel (for_each_owned_row): a row's own param or grad is read from
  // its start, the flat buffers at the row's flat offset, which only the device knows.
  const bool flat = grads.size() == 1 && num_segments != 1;
  GradsPlan plan;
  plan.walk.segments = segments.data_ptr<int64_t>();
  plan.walk.num_segments = num_segments;
  plan.walk.table = nullptr;
  plan.walk.flat_grad = nullptr;
  plan.walk.param_table = nullptr;
  plan.walk.lone_param = params.size() == 1 ? params[0].data_ptr() : nullptr;
  plan.walk.lone_param_numel = flat_numel;
  std::vector<int64_t> words;
  if (flat) {
    TORCH_CHECK(grads[0].is_contiguous(), "fusedopt: a flat grad buffer must be contiguous");
    plan.walk.space = grads[0].numel();
    plan.walk.flat_grad = grads[0].data_ptr();
  } else {
    append_grad_rows(grads, num_segments, words);
    plan.walk.space = words[num_segments];
  }
  const int64_t param_words = static_cast<int64_t>(words.size());
  if (param_rows)
    for (const at::Tensor& param : params)
      words.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(param.data_ptr())));
  if (words.empty()) return plan;
  plan.table = grad_table_cache().get(segments, !params.empty(), std::move(words));
  const int64_t* table = plan.table.data_ptr<int64_t>();
  if (!flat) plan.walk.table = table;
  if (param_rows) plan.walk.param_table = table + param_words;
  return plan;
}

}  // namespace cuda
}  // namespace fusedopt
