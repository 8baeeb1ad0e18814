// The per-row table of the CUDA kernels: how the host writes it (build_row_table) and
// how a kernel reads it (RowWalk, GradRef, first_row_ending_after, row_span,
// row_param). Plain C++ apart from C10_HOST_DEVICE, so the CPU-built `fusedopt._C`
// runs the same readers over the same words on the host, where tests check them
// against torch (tests/test_row_table.py); the CUDA kernels (cuda/row_walk.cuh) call
// them per row, never per element, except GradRef::offset.
//
// [note: index space] The launch splits one linear index space into equal,
// 256-element-aligned ranges, one per warp. For a flat grad buffer that space is the
// flat buffer itself (row r spans [flat_offset, flat_offset + numel)). For one grad per
// row it is the rows packed back to back, each padded to kRowPad elements: the host
// knows the grads' sizes but not the device-resident segment table, and the padding
// keeps a warp's first element in a row at a multiple of kRowPad, so 128-bit accesses
// stay aligned when the range starts inside a row. Either way a warp binary-searches
// its first row once and then walks rows forward, so many small parameters cost one
// search, not one per parameter, and the warps on an SM walk independently.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "segment_table.h"

namespace fusedopt {

// Packed rows start at multiples of this (>= 16 bytes for every dtype). It also charges
// tiny parameters a few elements' worth of their per-row overhead in the load balance.
constexpr int64_t kRowPad = 32;

// The per-row grad table (one grad per row) as uploaded, in int64 words:
//   [0, n + 1)            packed start of each row, then the packed end
//   [n + 1, n + 1 + 3n)   per row: data pointer, numel, shape word index (-1: contiguous)
//   [...]                 shapes of strided grads: ndim, sizes[ndim], strides[ndim]
// followed, when the call has one param per row, by each row's param data pointer.
constexpr int64_t kRowWords = 3;

// One row's grad: contiguous from `data`, or a strided view described by `shape`.
template <typename scalar_t>
struct GradRef {
  scalar_t* data;
  const int64_t* shape;  // nullptr when contiguous; else ndim, sizes..., strides...
  bool narrow;           // every logical index fits 32 bits: cheaper division

  // Memory offset of the element at row-major logical index j.
  C10_HOST_DEVICE int64_t offset(int64_t j) const {
    if (shape == nullptr) return j;
    const int ndim = static_cast<int>(shape[0]);
    const int64_t* sizes = shape + 1;
    const int64_t* strides = shape + 1 + ndim;
    int64_t off = 0;
    if (narrow) {
      uint32_t rest = static_cast<uint32_t>(j);
      for (int d = ndim - 1; d > 0; --d) {
        const uint32_t size = static_cast<uint32_t>(sizes[d]);
        off += static_cast<int64_t>(rest % size) * strides[d];
        rest /= size;
      }
      return off + static_cast<int64_t>(rest) * strides[0];
    }
    for (int d = ndim - 1; d > 0; --d) {
      off += (j % sizes[d]) * strides[d];
      j /= sizes[d];
    }
    return off + j * strides[0];
  }
};

// Kernel argument describing the index space and where the grads and params are.
struct RowWalk {
  const int64_t* segments;
  int64_t num_segments;
  int64_t space;       // length of the index space
  int64_t per_warp;    // elements of the space per warp, a multiple of kWarpRangeGranule
  const int64_t* table;  // the per-row grad table, or nullptr for one flat grad buffer
  void* flat_grad;
  // The params (segment_table.h): per row, its data pointer (uploaded with the grad
  // table), or nullptr for a lone param, `lone_param`, of `lone_param_numel` elements.
  const int64_t* param_table;
  void* lone_param;
  int64_t lone_param_numel;
};

// Row r's first param element: its own tensor's, or the lone param's (the flat param
// buffer at the row's flat offset, unless it is the row's own: one row of its size).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t* row_param(const RowWalk& walk, int64_t r, int64_t flat_offset) {
  if (walk.param_table != nullptr) {
    scalar_t* data = reinterpret_cast<scalar_t*>(walk.param_table[r]);
#ifdef __CUDA_ARCH__
    __builtin_assume(__isGlobal(data));
#endif
    return data;
  }
  const bool own = walk.num_segments == 1 && walk.lone_param_numel == walk.segments[kNumel];
  return static_cast<scalar_t*>(walk.lone_param) + (own ? 0 : flat_offset);
}

// The first row whose extent in the index space ends after `position`.
C10_HOST_DEVICE inline int64_t first_row_ending_after(const RowWalk& walk, int64_t position) {
  const int64_t* seg = walk.segments;
  int64_t lo = 0, hi = walk.num_segments;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t row_end = walk.table != nullptr
                                ? walk.table[mid + 1]
                                : seg[mid * kSegmentColumns + kFlatOffset] + seg[mid * kSegmentColumns + kNumel];
    if (row_end <= position) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

C10_HOST_DEVICE inline const int64_t* table_row(const RowWalk& walk, int64_t r) {
  return walk.table + (walk.num_segments + 1) + r * kRowWords;
}

template <typename scalar_t>
C10_HOST_DEVICE inline GradRef<scalar_t> table_grad(const RowWalk& walk, const int64_t* row, int64_t grad_base) {
  // Table addresses arrive as integers; on the device, without the assumption the
  // compiler emits generic loads and stores for them.
  scalar_t* data = reinterpret_cast<scalar_t*>(row[0]);
#ifdef __CUDA_ARCH__
  __builtin_assume(__isGlobal(data));
#endif
  return {data + grad_base, row[2] < 0 ? nullptr : walk.table + row[2], row[1] <= static_cast<int64_t>(UINT32_MAX)};
}

// Row r in the index space: positions [start, start + numel) are its elements 0, 1, ...
// (any other position up to the next row's start is padding), read through `grad`.
// [note: same PTX] row_span was for_each_owned_row's loop body; with the fields in this
// order, assigned in two branches, and the address assumptions written out where an
// address is read (not in a helper), nvcc emits the kernels' PTX as before the move,
// instruction for instruction. Other orders renumber registers, and a helper lost the
// global address space of a strided grad's stores.
template <typename scalar_t>
struct RowSpan {
  GradRef<scalar_t> grad;
  int64_t start;
  int64_t numel;
  int64_t flat_offset;
};

template <typename scalar_t>
C10_HOST_DEVICE inline RowSpan<scalar_t> row_span(const RowWalk& walk, int64_t r) {
  const int64_t* seg = walk.segments;
  RowSpan<scalar_t> span;
  span.flat_offset = seg[r * kSegmentColumns + kFlatOffset];
  const int64_t segment_numel = seg[r * kSegmentColumns + kNumel];
  if (walk.table == nullptr) {
    span.start = span.flat_offset;
    span.numel = segment_numel;
    span.grad = {static_cast<scalar_t*>(walk.flat_grad) + span.flat_offset, nullptr, true};
  } else {
    const int64_t* row = table_row(walk, r);
    const int64_t grad_numel = row[1];
    // segment_table.h's tensors_are_flat, decided here because only the device knows the
    // row's numel: a lone grad of another size than its lone row is the flat grad buffer,
    // holding the row at its flat offset.
    const int64_t grad_base = grad_numel != segment_numel && row[2] < 0 ? span.flat_offset : 0;
    span.start = walk.table[r] + grad_base;
    const int64_t available = grad_numel - grad_base;
    span.numel = segment_numel < available ? segment_numel : available;
    if (span.numel < 0) span.numel = 0;
    span.grad = table_grad<scalar_t>(walk, row, grad_base);
  }
  return span;
}

// Host side ---------------------------------------------------------------------------

// Appends a shape with size-1 dims dropped and mergeable dims merged (a transposed
// matrix stays 2-D, a permuted 4-D tensor often becomes 2-D or 3-D), so the kernel
// divides as little as possible. Returns the shape's word index, or -1 when the shape
// is contiguous after all.
inline int64_t append_shape(at::IntArrayRef sizes, at::IntArrayRef strides, std::vector<int64_t>& words) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  for (size_t d = 0; d < sizes.size(); ++d) {
    const int64_t size = sizes[d], stride = strides[d];
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

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// The per-row grad table of one grad per row, into `words`.
inline void append_grad_rows(at::TensorList grads, int64_t num_segments, std::vector<int64_t>& words) {
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
    const int64_t shape = grad.is_contiguous() ? -1 : append_shape(grad.sizes(), grad.strides(), words);
    words[rows_begin + kRowWords * r + 2] = shape;
  }
  words[num_segments] = packed;
}

// One op call's rows as the host sees them: the RowWalk but for its table pointers, and
// the table's words (grad rows unless the grads are flat, then param pointers when
// there is one param per row; none: nothing to upload).
struct RowTable {
  RowWalk walk;
  std::vector<int64_t> words;
  bool grads_in_table = false;
  int64_t param_words = -1;  // index of the first param pointer, -1: none

  // The walk reading the table from `table`: the words' copy on the device, or `words`.
  RowWalk walk_at(const int64_t* table) const {
    RowWalk read = walk;
    read.table = grads_in_table ? table : nullptr;
    read.param_table = param_words >= 0 ? table + param_words : nullptr;
    return read;
  }
};

// Picks flat or per-row grads and params the way the CPU kernels do and writes the
// table's words. Reads no tensor's memory but the segments' address.
inline RowTable build_row_table(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                                bool zero_grads) {
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
  // row's own grad by numel (row_span): a row's own param or grad is read from its
  // start, the flat buffers at the row's flat offset, which only the device knows.
  const bool flat = grads.size() == 1 && num_segments != 1;
  RowTable rows;
  rows.walk.segments = segments.data_ptr<int64_t>();
  rows.walk.num_segments = num_segments;
  rows.walk.per_warp = 0;
  rows.walk.table = nullptr;
  rows.walk.flat_grad = nullptr;
  rows.walk.param_table = nullptr;
  rows.walk.lone_param = params.size() == 1 ? params[0].data_ptr() : nullptr;
  rows.walk.lone_param_numel = params.size() == 1 ? params[0].numel() : -1;
  if (flat) {
    TORCH_CHECK(grads[0].is_contiguous(), "fusedopt: a flat grad buffer must be contiguous");
    rows.walk.space = grads[0].numel();
    rows.walk.flat_grad = grads[0].data_ptr();
  } else {
    append_grad_rows(grads, num_segments, rows.words);
    rows.walk.space = rows.words[num_segments];
    rows.grads_in_table = true;
  }
  if (param_rows) {
    rows.param_words = static_cast<int64_t>(rows.words.size());
    for (const at::Tensor& param : params)
      rows.words.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(param.data_ptr())));
  }
  return rows;
}

}  // namespace fusedopt
