// The row contract every fusedopt op shares: where each row's param, grad and state
// live. A row is one parameter (or, sharded, one rank's piece of one); a call updates
// every row of a param group on one (device, dtype), wherever its memory is.
//
// `segments` holds one int64 row per row to update:
//   flat_offset  the row's place in the layout of the state buffers (moments, momentum,
//                master copy): every state buffer holds the row at
//                [flat_offset, flat_offset + numel). It is also the element index that
//                stochastic rounding hashes (optimizer_math.h, [note: random bits]).
//   numel        the row's elements
//   param_index  its entry in the `step` tensor
//
// The `params` list has either
//   * one tensor, the flat param buffer: row i is params[0][flat_offset, + numel) (the
//     rows fusedopt moved into its own memory, adjacent and aligned); or
//   * one contiguous tensor per row, of `numel` elements: the row's own memory, wherever
//     it is (a DTensor shard, shared memory, a view of a user's tensor), or its slice of
//     the flat buffer when the call mixes both kinds.
// The `grads` list has either
//   * one tensor, a flat grad buffer laid out like the state buffers
//     (zero_grad(set_to_none=False) keeps grads as views into it): row i reads
//     grads[0][flat_offset, flat_offset + numel); or
//   * one tensor per row, of `numel` elements, read in row-major logical order. Python
//     permutes each grad's dims into its parameter's memory order first, so a grad
//     with the parameter's strides arrives contiguous, and one with other strides
//     (bmm, einsum, channels_last) arrives as a strided view that is read in place.
// In both lists a single tensor for a single row of the same numel is that row's own.
//
// The CPU kernels check every row against its tensors before writing anything. The
// CUDA kernels cannot see the device-resident table: they read a single param or
// contiguous grad of another size than the row as the flat buffer holding the row at its
// flat offset, a strided one from its start, either clamped to the tensor's end
// (row_table.h, row_span: never out of bounds, but not an error), so callers must pass tensors of
// the right size: fusedopt's optimizers check every grad's shape against its
// parameter's, and every parameter's place, before they call an op.
#pragma once

#include <cstdint>

namespace fusedopt {

// Whether a list of `num_tensors` per-row tensors is one flat buffer: unless it holds
// exactly one tensor per row. A single tensor for a single row of the same size counts
// as that row's own (which also reads a flat buffer with no padding correctly).
inline bool tensors_are_flat(int64_t num_tensors, int64_t num_segments, int64_t first_tensor_numel,
                             int64_t first_segment_numel) {
  return num_tensors == 1 && !(num_segments == 1 && first_tensor_numel == first_segment_numel);
}

enum SegmentColumn : int64_t {
  kFlatOffset = 0,   // first element of the row in the state buffers
  kNumel = 1,        // elements of the row
  kParamIndex = 2,   // index of the row's entry in the `step` tensor
  kSegmentColumns = 3,
};

}  // namespace fusedopt
