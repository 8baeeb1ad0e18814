// Layout of the `segments` tensor every fusedopt op takes: one int64 row per
// parameter to update, in flat-buffer order. Python (fusedopt/flat_buffer.py) writes
// it; the CPU and CUDA kernels read it.
//
// The `grads` list that comes with it has either
//   * one tensor, a flat grad buffer laid out exactly like the flat param buffer
//     (zero_grad(set_to_none=False) keeps grads as views into it): row i reads
//     grads[0][flat_offset, flat_offset + numel); or
//   * one tensor per row, of `numel` elements, read in row-major logical order. Python
//     permutes each grad's dims into its parameter's memory order first, so a grad
//     with the parameter's strides arrives contiguous, and one with other strides
//     (bmm, einsum, channels_last) arrives as a strided view that is read in place.
//
// The CPU kernels check each grad's numel against its row before writing anything. The
// CUDA kernels cannot: the table is on the device, and reading it on the host would sync
// every step. They read a contiguous grad of another size as a flat buffer holding the
// row at its flat offset, a strided one from its start, either clamped to the grad's end
// (row_walk.cuh, for_each_owned_row: never out of bounds, but not an error), so
// callers must pass grads of the right size: fusedopt's optimizers check every grad's
// shape against its parameter's before they call an op.
#pragma once

#include <cstdint>

namespace fusedopt {

// The grads list is one flat buffer unless it holds exactly one grad per segment. A
// single grad for a single segment of the same size counts as that segment's grad
// (read in logical order), which also reads a flat buffer with no padding correctly.
inline bool grads_are_flat(int64_t num_grads, int64_t num_segments, int64_t first_grad_numel,
                           int64_t first_segment_numel) {
  return num_grads == 1 && !(num_segments == 1 && first_grad_numel == first_segment_numel);
}

enum SegmentColumn : int64_t {
  kFlatOffset = 0,   // first element of the parameter in the flat buffers
  kNumel = 1,        // elements of the parameter
  kParamIndex = 2,   // index of the parameter's entry in the `step` tensor
  kSegmentColumns = 3,
};

}  // namespace fusedopt
