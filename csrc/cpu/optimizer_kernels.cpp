// CPU kernels of the fusedopt ops: SIMD loads/stores, ATen's thread pool, and the
// math of optimizer_math.h.
//
// setup.py compiles this file once per x86 ISA level (CPU_CAPABILITY = DEFAULT, AVX2,
// AVX512, and AVX512 with FUSEDOPT_AVX512_BF16) into separate modules; fusedopt/ops.py
// loads the best one for the running CPU, which registers these kernels for the CPU
// dispatch key.
#include "optimizer_math.h"
#include "segment_table.h"
#include "state_buffers.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <Python.h>
#include <torch/library.h>

#include <c10/util/SmallVector.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace fusedopt {

using at::vec::Vectorized;

template <>
inline Vectorized<float> opmath_sqrt(Vectorized<float> x) { return x.sqrt(); }
template <>
inline Vectorized<double> opmath_sqrt(Vectorized<double> x) { return x.sqrt(); }
template <>
inline Vectorized<float> opmath_maximum(Vectorized<float> a, Vectorized<float> b) {
  return at::vec::maximum(a, b);
}
template <>
inline Vectorized<double> opmath_maximum(Vectorized<double> a, Vectorized<double> b) {
  return at::vec::maximum(a, b);
}
template <>
inline Vectorized<float> select_where_equal(Vectorized<float> a, Vectorized<float> b, Vectorized<float> x,
                                            Vectorized<float> y) {
  return Vectorized<float>::blendv(y, x, a == b);
}

using Bits = Vectorized<int32_t>;  // a SIMD vector of uint32 bit patterns (wrapping arithmetic)

template <>
struct BitsOf<Vectorized<float>> {
  using type = Bits;
};
template <>
struct FloatOf<Bits> {
  using type = Vectorized<float>;
};

template <>
inline Bits float_bits(Vectorized<float> x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Bits(_mm512_castps_si512(x));
#elif defined(CPU_CAPABILITY_AVX2)
  return Bits(_mm256_castps_si256(x));
#else
  return at::vec::cast<int32_t>(x);
#endif
}

template <>
inline Vectorized<float> bits_as_float(Bits bits) {
  return at::vec::cast<float>(bits);
}

template <>
inline Bits shift_right_logical(Bits x, int bits) {
#if defined(CPU_CAPABILITY_AVX512)
  return Bits(_mm512_srli_epi32(x, bits));
#elif defined(CPU_CAPABILITY_AVX2)
  return Bits(_mm256_srli_epi32(x, bits));
#else
  return (x >> Bits(bits)) & Bits(static_cast<int32_t>(0xffffffffu >> bits));
#endif
}

namespace {

// Loads and stores a block of kWidth elements of scalar_t as two opmath vectors; the
// last block of a row may hold fewer (`count`): the rest of the lanes load as zeros
// and are not stored. [note: tails as vectors] A row's tail runs the same vector code
// as its body, so every element rounds alike (as torch's fused CPU Adam does).
template <typename scalar_t, typename = void>
struct VecIO {  // float, double: two plain vectors
  using opmath_t = scalar_t;
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t kWidth = 2 * Vec::size();
  template <typename Count = std::integral_constant<int64_t, kWidth>>
  static void load(const scalar_t* ptr, Vec& lo, Vec& hi, Count count = {}) {
    if (count == kWidth) {
      lo = Vec::loadu(ptr);
      hi = Vec::loadu(ptr + Vec::size());
      return;
    }
    lo = Vec::loadu(ptr, std::min<int64_t>(count, Vec::size()));
    hi = count > Vec::size() ? Vec::loadu(ptr + Vec::size(), count - Vec::size()) : Vec(scalar_t(0));
  }
  template <typename Count = std::integral_constant<int64_t, kWidth>>
  static void store(scalar_t* ptr, const Vec& lo, const Vec& hi, Count count = {}) {
    if (count == kWidth) {
      lo.store(ptr);
      hi.store(ptr + Vec::size());
      return;
    }
    lo.store(ptr, std::min<int64_t>(count, Vec::size()));
    if (count > Vec::size()) hi.store(ptr + Vec::size(), count - Vec::size());
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// [note: bfloat16 on AVX-512] A bfloat16 is the high half of a float's bits. A block of
// 32 loads as one word permutation per 16 (each bfloat16 into the high half of a 32-bit
// lane, zeros below), and stores, once rounded, as the high halves of its 32 lanes
// gathered in order by one vpermt2w. at::vec's conversions take a zero-extension and a
// shift per 16 to load and, to store, a shift, a mask, two adds and a blend per 16 plus a
// pack and a lane fix-up per 32. On this project's Zen 4 those shifts and shuffles
// share pipes with Adam's divides and square roots, which already bound the fp32 step:
// at::vec's sequences made bf16 params + bf16 state 1.5x slower than fp32 per element
// in cache (0.74 vs 0.50 ns), these match it. The bits are at::vec's, NaN (stored as
// 0xffff) included.
namespace bf16x32 {

// Word indices: each 32-bit lane k takes bfloat16 `first + k` into its high half.
template <int first>
inline __m512i high_half_index() {
  return _mm512_set_epi32((first + 15) << 16, (first + 14) << 16, (first + 13) << 16, (first + 12) << 16,
                          (first + 11) << 16, (first + 10) << 16, (first + 9) << 16, (first + 8) << 16,
                          (first + 7) << 16, (first + 6) << 16, (first + 5) << 16, (first + 4) << 16,
                          (first + 3) << 16, (first + 2) << 16, (first + 1) << 16, first << 16);
}
constexpr __mmask32 kHighWords = 0xaaaaaaaau;

inline void unpack(__m512i packed, Vectorized<float>& lo, Vectorized<float>& hi) {
  lo = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(kHighWords, high_half_index<0>(), packed));
  hi = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(kHighWords, high_half_index<16>(), packed));
}

// The high halves of lo's then hi's 32-bit lanes, in order; 0xffff where `nan_of_lo` /
// `nan_of_hi` (the floats being stored) are NaN, as at::vec stores NaN.
inline __m512i high_halves(__m512i lo, __m512i hi, __m512 nan_of_lo, __m512 nan_of_hi) {
  // Word 2k+1 of (lo, hi): lane k's high half; idx bit 5 picks hi.
  const __m512i odd_words = _mm512_set_epi32(
      0x003f003d, 0x003b0039, 0x00370035, 0x00330031, 0x002f002d, 0x002b0029, 0x00270025, 0x00230021,
      0x001f001d, 0x001b0019, 0x00170015, 0x00130011, 0x000f000d, 0x000b0009, 0x00070005, 0x00030001);
  const __m512i packed = _mm512_permutex2var_epi16(lo, odd_words, hi);
  // One compare finds whether either vector holds a NaN (unordered: either operand is).
  if (C10_LIKELY(_mm512_cmp_ps_mask(nan_of_lo, nan_of_hi, _CMP_UNORD_Q) == 0)) return packed;
  const __mmask32 nan = _mm512_kunpackw(_mm512_cmp_ps_mask(nan_of_hi, nan_of_hi, _CMP_UNORD_Q),
                                        _mm512_cmp_ps_mask(nan_of_lo, nan_of_lo, _CMP_UNORD_Q));
  return _mm512_mask_mov_epi16(packed, nan, _mm512_set1_epi32(-1));
}

// x + 0x7fff + (bit 16 of x): its high half is x rounded to nearest even.
inline __m512i nearest_even_biased(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
}

// lo, hi rounded to nearest even, as at::vec's convert_from_float<BFloat16>.
inline __m512i round_nearest(__m512 lo, __m512 hi) {
#if defined(FUSEDOPT_AVX512_BF16)
  // vcvtne2ps2bf16 rounds a normal number, a zero or an infinity exactly as the integer
  // sequence, but flushes denormals to zero and keeps a NaN's payload: a block holding
  // either (never in practice) takes the integer path.
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // quiet NaN, denormal, signalling NaN
  if (C10_LIKELY((_mm512_fpclass_ps_mask(lo, kNanOrDenormal) | _mm512_fpclass_ps_mask(hi, kNanOrDenormal)) == 0))
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
#endif
  return high_halves(nearest_even_biased(lo), nearest_even_biased(hi), lo, hi);
}

template <typename Count>
inline __m512i load(const c10::BFloat16* ptr, Count count) {
  if (count == 32) return _mm512_loadu_si512(ptr);
  return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t(1) << count) - 1), ptr);
}

template <typename Count>
inline void store(c10::BFloat16* ptr, __m512i packed, Count count) {
  if (count == 32) _mm512_storeu_si512(ptr, packed);
  else _mm512_mask_storeu_epi16(ptr, static_cast<__mmask32>((uint64_t(1) << count) - 1), packed);
}

}  // namespace bf16x32
#endif

template <typename scalar_t>
struct VecIO<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using opmath_t = float;
  using Vec = Vectorized<float>;
  static constexpr int64_t kWidth = Vectorized<scalar_t>::size();
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kBf16x32 = std::is_same_v<scalar_t, c10::BFloat16>;  // [note: bfloat16 on AVX-512]
#else
  static constexpr bool kBf16x32 = false;
#endif
  template <typename Count = std::integral_constant<int64_t, kWidth>>
  static void load(const scalar_t* ptr, Vec& lo, Vec& hi, Count count = {}) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBf16x32) {
      bf16x32::unpack(bf16x32::load(ptr, count), lo, hi);
      return;
    }
#endif
    const auto loaded = count == kWidth ? Vectorized<scalar_t>::loadu(ptr) : Vectorized<scalar_t>::loadu(ptr, count);
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(loaded);
  }
  template <typename Count = std::integral_constant<int64_t, kWidth>>
  static void store(scalar_t* ptr, const Vec& lo, const Vec& hi, Count count = {}) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBf16x32) {
      bf16x32::store(ptr, bf16x32::round_nearest(lo, hi), count);
      return;
    }
#endif
    if (count == kWidth) at::vec::convert_from_float<scalar_t>(lo, hi).store(ptr);
    else at::vec::convert_from_float<scalar_t>(lo, hi).store(ptr, count);
  }
  // lo, hi rounded to scalar_t (to nearest even) and back to float.
  static void load_rounded(const Vec& lo, const Vec& hi, Vec& rounded_lo, Vec& rounded_hi) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBf16x32) {
      bf16x32::unpack(bf16x32::round_nearest(lo, hi), rounded_lo, rounded_hi);
      return;
    }
#endif
    std::tie(rounded_lo, rounded_hi) =
        at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(lo, hi));
  }
};

// [note: work split by elements] The rows of a call are laid end to end in one index
// space, cut into chunks of kChunk elements whatever the rows' sizes: the threads share
// chunks, not tensors, so one big row is split across cores and thousands of small ones
// are batched, in one parallel region. A chunk's result never depends on how many
// threads run (grad_norm sums per chunk, then in chunk order).
constexpr int64_t kChunk = 1 << 15;
// Strided grads are gathered this many elements at a time into a stack buffer, so the
// SIMD loop always reads contiguous memory without copying a whole grad.
constexpr int64_t kGatherBlock = 512;

class RowSpace {
 public:
  RowSpace(const int64_t* seg, int64_t num_segments) : starts_(num_segments + 1, 0) {
    for (int64_t s = 0; s < num_segments; ++s) starts_[s + 1] = starts_[s] + seg[s * kSegmentColumns + kNumel];
  }

  int64_t num_chunks() const { return (starts_.back() + kChunk - 1) / kChunk; }

  // Calls piece(segment, begin, end) for each row overlapping chunk `chunk`, with
  // [begin, end) the overlap in row-local elements, in row order.
  template <typename Piece>
  void for_each_piece(int64_t chunk, const Piece& piece) const {
    const int64_t lo = chunk * kChunk, hi = std::min(lo + kChunk, starts_.back());
    // The first row that ends after lo (empty rows end where they start: skipped).
    int64_t s = std::upper_bound(starts_.begin() + 1, starts_.end(), lo) - starts_.begin() - 1;
    for (const int64_t n = static_cast<int64_t>(starts_.size()) - 1; s < n && starts_[s] < hi; ++s) {
      const int64_t begin = std::max(lo, starts_[s]), end = std::min(hi, starts_[s + 1]);
      if (begin < end) piece(s, begin - starts_[s], end - starts_[s]);
    }
  }

 private:
  std::vector<int64_t> starts_;  // prefix sums of the rows' numel
};

// Where row `segment` of the grads list lives, and how to read it.
template <typename scalar_t>
struct GradSource {
  scalar_t* data;       // first element of the segment's grad
  bool contiguous;
  const at::Tensor* strided;  // the grad itself when it is not contiguous
};

// [note: prefetching the rows' tensors] A row's address is two dependent loads away,
// its TensorImpl then the StorageImpl, which the kernel's last pass streamed out of the
// caches: tensor s's are requested kAheadRows rows ahead, its StorageImpl's half as far
// (3000 shared-memory params, SGD, perf: param_rows and grad_sources 4.8% -> 3.0% of the
// main thread's samples).
constexpr int64_t kAheadRows = 8;

inline void prefetch_tensor(const at::TensorList tensors, int64_t s) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  if (s + kAheadRows < n) __builtin_prefetch(tensors[s + kAheadRows].unsafeGetTensorImpl(), 0, 3);
  if (s + kAheadRows / 2 < n)
    __builtin_prefetch(tensors[s + kAheadRows / 2].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 0, 3);
}

// Every segment's GradSource, gathered in one pass before the threads start: the
// update loop then reads one small array instead of a Tensor per row, whose metadata
// its own streaming through the buffers has long evicted from the cache (3000 small
// tensors: ~0.3 ms of cache misses per step).
template <typename scalar_t>
std::vector<GradSource<scalar_t>> grad_sources(const at::TensorList grads, bool flat_grads, const int64_t* seg,
                                               int64_t num_segments) {
  std::vector<GradSource<scalar_t>> sources(num_segments);
  if (flat_grads) {
    scalar_t* base = grads[0].data_ptr<scalar_t>();
    for (int64_t s = 0; s < num_segments; ++s)
      sources[s] = {base + seg[s * kSegmentColumns + kFlatOffset], true, nullptr};
    return sources;
  }
  for (int64_t s = 0; s < num_segments; ++s) {
    prefetch_tensor(grads, s);
    const at::Tensor& g = grads[s];
    sources[s] = {g.data_ptr<scalar_t>(), g.is_contiguous(), &g};
  }
  return sources;
}

// The first element of every row's param (segment_table.h), gathered as grad_sources.
template <typename scalar_t>
std::vector<scalar_t*> param_rows(const at::TensorList params, bool flat_params, const int64_t* seg,
                                  int64_t num_segments) {
  std::vector<scalar_t*> rows(num_segments);
  for (int64_t s = 0; s < num_segments; ++s) {
    if (!flat_params) prefetch_tensor(params, s);
    rows[s] = flat_params ? params[0].data_ptr<scalar_t>() + seg[s * kSegmentColumns + kFlatOffset]
                          : params[s].data_ptr<scalar_t>();
  }
  return rows;
}

// Copies elements [begin, end) (row-major logical order) of a strided grad into out.
template <typename scalar_t>
void gather_strided(const at::Tensor& grad, int64_t begin, int64_t end, scalar_t* out) {
  const int64_t dim = grad.dim();
  const auto sizes = grad.sizes();
  const auto strides = grad.strides();
  c10::SmallVector<int64_t, 8> index(dim, 0);
  int64_t rest = begin;
  for (int64_t d = dim - 1; d >= 0; --d) {
    index[d] = rest % sizes[d];
    rest /= sizes[d];
  }
  const scalar_t* base = grad.data_ptr<scalar_t>();
  for (int64_t i = begin; i < end; ++i) {
    int64_t offset = 0;
    for (int64_t d = 0; d < dim; ++d) offset += index[d] * strides[d];
    out[i - begin] = base[offset];
    for (int64_t d = dim - 1; d >= 0; --d) {
      if (++index[d] < sizes[d]) break;
      index[d] = 0;
    }
  }
}

// Runs `update(i, n, grad_ptr)` over elements [begin, end) of a segment in pieces
// whose grads are contiguous: directly for contiguous grads, via a small gather
// buffer for strided ones. Zeroes what was read when asked to.
template <typename scalar_t, typename Update>
void for_each_contiguous_grad_block(const GradSource<scalar_t>& src, int64_t begin, int64_t end,
                                    bool zero_grads, const Update& update) {
  if (src.contiguous) {
    update(begin, end - begin, src.data + begin);
    if (zero_grads) std::fill(src.data + begin, src.data + end, scalar_t(0));
    return;
  }
  scalar_t block[kGatherBlock];
  for (int64_t b = begin; b < end; b += kGatherBlock) {
    const int64_t n = std::min(kGatherBlock, end - b);
    gather_strided(*src.strided, b, b + n, block);
    update(b, n, block);
  }
}

// found_inf was set: leave everything untouched.
bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<double>() != 0.0;
}

// The scheduled hyperparameters (ops.cpp): the floats, or the values of `scheduled`.
template <size_t N>
std::array<double, N> scheduled_values(std::array<double, N> values, const std::optional<at::Tensor>& scheduled) {
  if (!scheduled.has_value()) return values;
  TORCH_CHECK(scheduled->numel() == static_cast<int64_t>(N), "fusedopt: scheduled must hold ", N,
              " values, got ", scheduled->numel());
  const at::Tensor host = scheduled->to(at::kCPU, at::kDouble).contiguous();
  for (size_t i = 0; i < N; ++i) values[i] = host.const_data_ptr<double>()[i];
  return values;
}

template <typename opmath_t>
std::optional<opmath_t> optional_scalar(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return static_cast<opmath_t>(t->item<double>());
}

// A call's rows as checked against segment_table.h's contract.
struct RowsCheck {
  bool flat_params;
  bool flat_grads;
  int64_t extent;  // the state buffers must hold this many elements (every row's end)
  at::ScalarType dtype;
  at::Device device;
};

// Whether every element of `t` lies in `numel` consecutive elements from its start.
bool is_dense_row(const at::Tensor& t, int64_t numel) { return t.numel() == numel && t.is_contiguous(); }

// Validates the rows contract of segment_table.h for the params and grads lists.
RowsCheck check_rows(const at::TensorList params, const at::Tensor& step, const at::TensorList grads,
                     const at::Tensor& segments) {
  TORCH_CHECK(!params.empty(), "fusedopt: expected at least one param");
  TORCH_CHECK(!grads.empty(), "fusedopt: expected at least one grad");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.is_contiguous() && step.dim() == 1,
              "fusedopt: step must be a 1-D float32 tensor of per-parameter counters");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 &&
                  segments.size(1) == kSegmentColumns && segments.is_contiguous() && segments.is_cpu(),
              "fusedopt: segments must be a contiguous int64 [n, ", int64_t(kSegmentColumns),
              "] tensor on the CPU");
  const int64_t num_segments = segments.size(0);
  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t first_numel = num_segments > 0 ? seg[kNumel] : -1;
  RowsCheck check{tensors_are_flat(static_cast<int64_t>(params.size()), num_segments, params[0].numel(),
                                   first_numel),
                  tensors_are_flat(static_cast<int64_t>(grads.size()), num_segments, grads[0].numel(),
                                   first_numel),
                  0, params[0].scalar_type(), params[0].device()};
  for (const auto& [flat, list, name] : {std::tuple{check.flat_params, params, "param"},
                                         std::tuple{check.flat_grads, grads, "grad"}}) {
    TORCH_CHECK(flat || static_cast<int64_t>(list.size()) == num_segments, "fusedopt: expected one flat ", name,
                " buffer or one ", name, " per segment, got ", list.size(), " ", name, "s for ", num_segments,
                " segments");
    TORCH_CHECK(!flat || list[0].is_contiguous(), "fusedopt: a flat ", name, " buffer must be contiguous");
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(!t.is_sparse(), "fusedopt: sparse gradients are not supported");
      TORCH_CHECK(t.scalar_type() == check.dtype && t.device() == check.device, "fusedopt: ", name, " ", i,
                  " is ", t.scalar_type(), " on ", t.device(), " but param 0 is ", check.dtype, " on ",
                  check.device);
    }
  }
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t* row = seg + s * kSegmentColumns;
    const int64_t end = row[kFlatOffset] + row[kNumel];
    TORCH_CHECK(row[kFlatOffset] >= 0 && row[kNumel] >= 0 && row[kParamIndex] >= 0 &&
                    row[kParamIndex] < step.numel(),
                "fusedopt: segment ", s, " lies outside the flat buffers");
    check.extent = std::max(check.extent, end);
    TORCH_CHECK(check.flat_params ? end <= params[0].numel() : is_dense_row(params[s], row[kNumel]),
                "fusedopt: param ", check.flat_params ? 0 : s, " does not hold segment ", s, " (",
                row[kNumel], " elements", check.flat_params ? " at its flat offset" : ", contiguous", ")");
    TORCH_CHECK(check.flat_grads ? end <= grads[0].numel() : grads[s].numel() == row[kNumel], "fusedopt: grad ",
                check.flat_grads ? 0 : s, " has ", grads[check.flat_grads ? 0 : s].numel(),
                " elements, segment ", s, " needs ", row[kNumel], check.flat_grads ? " at its flat offset" : "");
  }
  return check;
}

// How values are rounded when stored: to nearest even, or (with a key) stochastically
// for bfloat16 storage (optimizer_math.h, [note: rounding on store]).
struct Rounding {
  bool stochastic;
  uint32_t key;
};

// rounding_counter of lanes 0..31 relative to a block's first element.
constexpr std::array<int32_t, 32> kLaneCounters = [] {
  std::array<int32_t, 32> lanes{};
  for (uint32_t lane = 0; lane < 32; ++lane) lanes[lane] = static_cast<int32_t>(lane * 0x9e3779b1u);
  return lanes;
}();

// The random bits of one block of kWidth elements (two vectors): the element hash once,
// then each stored value's 16 bits (optimizer_math.h, [note: random bits]).
struct BlockBits {
  Bits hash[2];  // rounding_element_hash of the block's lo and hi lanes
  Bits high[2];  // hash >> 16, the hash's own last shift

  BlockBits() = default;
  BlockBits(const Rounding& rounding, int64_t index) {
    static_assert(2 * Bits::size() <= 32);
    const Bits base(static_cast<int32_t>(rounding_counter(static_cast<uint32_t>(index), rounding.key)));
    for (int half = 0; half < 2; ++half) {
      const Bits mixed = mix_bits_until_last_shift(base + Bits::loadu(kLaneCounters.data() + half * Bits::size()));
      high[half] = shift_right_logical(mixed, 16);
      hash[half] = mixed ^ high[half];
    }
  }

  // rounding_half(rounding_pair_hash(hash, slot / 2), slot) of vector `half` (0: lo).
  Bits random16(int slot, int half) const {
    if (slot == 1) return high[half];
#if defined(CPU_CAPABILITY_AVX512)
    // Slot 2's bits are the low half of hash * 0x2c1b3c6d, which only the hash's low
    // half reaches: one 16-bit multiply by 0x3c6d (by 0 in the high half) gives them.
    if (slot == 2) return Bits(_mm512_mullo_epi16(hash[half], _mm512_set1_epi32(0x3c6d)));
#endif
    return rounding_half(rounding_pair_hash(hash[half], slot >> 1), slot);
  }
};

// Stores kWidth opmath values (count of them) at ptr as storage type T, rounding
// stochastically with `bits` (value `slot`'s 16 of them) when given.
template <typename T, typename Vec, typename Count>
inline void store_rounded(T* ptr, Vec lo, Vec hi, const BlockBits* bits, int slot, Count count) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bits != nullptr) {
      const Bits random_lo = bits->random16(slot, 0), random_hi = bits->random16(slot, 1);
#if defined(CPU_CAPABILITY_AVX512)
      // round_stochastic_to_bfloat16, its truncation done by keeping the high halves
      // (the general path would round the already-rounded value to nearest once more).
      bf16x32::store(ptr, bf16x32::high_halves(float_bits(lo) + random_lo, float_bits(hi) + random_hi, lo, hi),
                     count);
      return;
#elif defined(CPU_CAPABILITY_AVX2)
      // The same with AVX2: the high halves by shift and pack, NaN as at::vec stores it.
      auto high_half = [](Vec x, Bits random) {
        const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(float_bits(x), random), 16);
        return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), rounded, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q)));
      };
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high_half(lo, random_lo), high_half(hi, random_hi)),
                                                      0xd8);
      if (count == VecIO<T>::kWidth) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptr), packed);
      } else {
        alignas(32) c10::BFloat16 block[VecIO<T>::kWidth];
        _mm256_store_si256(reinterpret_cast<__m256i*>(block), packed);
        std::copy(block, block + count, ptr);
      }
      return;
#else
      lo = round_stochastic_to_bfloat16(lo, random_lo);
      hi = round_stochastic_to_bfloat16(hi, random_hi);
#endif
    }
  }
  VecIO<T>::store(ptr, lo, hi, count);
}

// Whether any store of these dtypes can round stochastically (only bfloat16 ones do).
template <typename scalar_t, typename state_t>
constexpr bool kMayRoundStochastically =
    std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<state_t, c10::BFloat16>;

// The param as the update sees it: its value, or with master weights the fp32 master,
// unless the param was changed behind it ([note: master weights follow the param]).
template <typename scalar_t, typename Vec, typename Count>
inline void load_param(const scalar_t* param, const float* master, Vec& lo, Vec& hi, Count count) {
  VecIO<scalar_t>::load(param, lo, hi, count);
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    if (master != nullptr) {
      Vec m0, m1, r0, r1;
      VecIO<float>::load(master, m0, m1, count);
      // The master's rounding to the param's dtype, back in float.
      VecIO<scalar_t>::load_rounded(m0, m1, r0, r1);
      lo = master_or_param(m0, r0, lo);
      hi = master_or_param(m1, r1, hi);
    }
  }
}

// Stores the updated param: into the master and its rounding (to nearest even) into
// the param, or into the param rounded as asked.
template <typename scalar_t, typename Vec, typename Count>
inline void store_param(scalar_t* param, float* master, Vec lo, Vec hi, const BlockBits* bits, Count count) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    if (master != nullptr) {
      VecIO<float>::store(master, lo, hi, count);
      VecIO<scalar_t>::store(param, lo, hi, count);
      return;
    }
  }
  store_rounded(param, lo, hi, bits, 0, count);
}

// Calls block(i, count) over [0, n) in blocks of kWidth: full blocks with a count the
// compiler sees as constant, then a partial one ([note: tails as vectors]).
template <int64_t kWidth, typename Block>
inline void for_each_block(int64_t n, const Block& block) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) block(i, std::integral_constant<int64_t, kWidth>{});
  if (i < n) block(i, n - i);
}

// [note: prefetching the next row] A parameter in shared memory is a mapping of its own,
// its pages apart from the next parameter's: the hardware prefetcher cannot guess where
// the next row starts, so every row of such a group began with cache misses nothing had
// requested. Over a piece's last kPrefetchBytes the block loops request the next row's
// param and grad start. Only there: requesting every block's param and grad kPrefetchBytes
// ahead everywhere (as first written) took the SGD op over 3000 shared-memory rows of
// 2048 floats 1.06-1.11x faster on a 2-core EPYC Zen 3 with AVX2, but on a Zen 4 the
// AVX-512 kernels then ran GPT-2's big tensors ~25% slower (SGD 0.78x torch fused's speed
// where they ran 1.06x without; paired in one process, 2 and 3 processes per build).
// Prefetching at row ends only, on the Zen 4: GPT-2 SGD 1.04-1.10x, AdamW 1.03-1.05x
// (none: 1.05-1.06x, 1.06-1.14x); the SGD op over the 3000 shared-memory rows 2.17-2.65 ms
// (AVX-512; none: 2.34-2.72, every block: 2.50-3.09) and 2.18-2.34 ms (AVX2; none
// 2.37-2.59, every block 2.45-2.88), `benchmarks/host_cost.py --shared-memory`.
constexpr int64_t kPrefetchBytes = 1024;

// Where the next row's param and grad start, for prefetch_next_row.
template <typename scalar_t>
struct NextRow {
  scalar_t* param;
  const scalar_t* grad;
};

template <typename scalar_t>
NextRow<scalar_t> next_row(const std::vector<scalar_t*>& param_rows, const std::vector<GradSource<scalar_t>>& sources,
                           int64_t s) {
  const int64_t next = s + 1 < static_cast<int64_t>(sources.size()) ? s + 1 : s;
  return {param_rows[next], sources[next].data};
}

// In the block at element i of a piece of n elements: when i + kPrefetchBytes lies past
// the piece's end, requests the next row's param and grad that far into it.
template <typename scalar_t>
inline void prefetch_next_row(int64_t i, int64_t n, const NextRow<scalar_t>& next) {
  const int64_t j = i + kPrefetchBytes / static_cast<int64_t>(sizeof(scalar_t)) - n;
  if (j >= 0) {
    __builtin_prefetch(next.param + j, 1);
    __builtin_prefetch(next.grad + j, 0);
  }
}

// [note: invariants in locals] The block loops store through float pointers, and C++
// lets such a store alias any float the loop reads through a pointer or reference: the
// coefficients and the grad scale that the parallel region's lambdas capture by
// reference. GCC then reloads every coefficient and the EffectiveGrad values and re-tests them
// (scale, multiplier, maximize, weight decay) in every block of 16 elements. Each piece
// of a row copies them into locals that nothing else can reach, and those stay in
// registers, and each block is ~30 instructions shorter, so more blocks' loads are in
// flight at once. Measured against torch's fused AdamW in one process (paired medians,
// one series each, 2-core EPYC Zen 3, fp32, the bench's shared tensors): one
// 4M-element param on one thread 0.91x -> 0.97x of torch's speed, on two 0.98x ->
// 1.04x; GPT-2's 148 tensors on two 0.96x -> 1.04x. That machine's noise between
// series is +-5%.
//
// In registers, the flags are still tested for every vector: the grad transform's three,
// weight decay, SGD's first step (~10 branches a block). with_grad_of runs the common
// step (no scale, no multiplier, no maximize) with PlainGrad, and GCC then unswitches the
// loop on the rest itself: SGD's fp32 block goes from 50 instructions to 19. On one
// 6.1M-element fp32 param, paired against torch's fused step on the same tensors (same
// machine, 2 threads, medians of 9 / 4 processes per build): SGD 0.95x -> 1.02x, AdamW
// 0.96x -> 0.99x.
template <typename opmath_t>
EffectiveGrad<opmath_t> effective_grad_of(std::optional<opmath_t> grad_scale,
                                          std::optional<opmath_t> grad_multiplier, bool maximize) {
  EffectiveGrad<opmath_t> e;
  e.scale = grad_scale.value_or(opmath_t(1));
  e.multiplier = grad_multiplier.value_or(opmath_t(1));
  e.has_scale = grad_scale.has_value();
  e.has_multiplier = grad_multiplier.has_value();
  e.maximize = maximize;
  return e;
}

// The grad transform of the common step (no scale, no multiplier, no maximize).
struct PlainGrad {
  template <typename T>
  T operator()(T grad) const { return grad; }
};

// body(grad_of) with the step's transform, or PlainGrad when it changes nothing: the
// block loop then has no per-block tests of the transform's flags.
template <typename opmath_t, typename Body>
inline void with_grad_of(const EffectiveGrad<opmath_t>& e, const Body& body) {
  if (!e.has_scale && !e.has_multiplier && !e.maximize) {
    body(PlainGrad{});
  } else {
    body(e);
  }
}

// Adam over every row of the call. Params are scalar_t (with an optional float32 master
// copy), the moments state_t; both load into the same opmath vectors.
template <typename scalar_t, typename state_t, bool amsgrad>
void adam_kernel(const std::vector<scalar_t*>& param_rows, float* master, state_t* exp_avg, state_t* exp_avg_sq,
                 state_t* max_exp_avg_sq, const float* step, const std::vector<GradSource<scalar_t>>& sources,
                 const int64_t* seg, const RowSpace& space, double lr, double beta1,
                 double beta2, double weight_decay, double eps, bool decoupled, bool maximize,
                 std::optional<at::opmath_type<scalar_t>> grad_scale,
                 std::optional<at::opmath_type<scalar_t>> grad_multiplier, bool zero_grads,
                 Rounding rounding) {
  using IO = VecIO<scalar_t>;
  using SIO = VecIO<state_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  static_assert(IO::kWidth == SIO::kWidth && std::is_same_v<opmath_t, typename SIO::opmath_t>);
  const EffectiveGrad<opmath_t> effective_grad = effective_grad_of(grad_scale, grad_multiplier, maximize);

  at::parallel_for(0, space.num_chunks(), 1, [&](int64_t first, int64_t last) {
    // Rows mostly share their step: the double-precision powers are redone only when it
    // changes (thousands of small tensors would otherwise pay two pow() each).
    float coefficients_step = -1.0f;
    AdamCoefficients<opmath_t> c;
    for (int64_t chunk = first; chunk < last; ++chunk) space.for_each_piece(chunk, [&](int64_t s, int64_t begin,
                                                                                       int64_t end) {
      const int64_t* row = seg + s * kSegmentColumns;
      const float row_step = step[row[kParamIndex]];
      if (row_step != coefficients_step) {
        c = adam_coefficients<opmath_t>(lr, beta1, beta2, weight_decay, eps, decoupled, static_cast<double>(row_step));
        coefficients_step = row_step;
      }
      const int64_t base = row[kFlatOffset];
      const NextRow<scalar_t> next = next_row(param_rows, sources, s);
      for_each_contiguous_grad_block(sources[s], begin, end, zero_grads,
                                     [&](int64_t i0, int64_t n, const scalar_t* g) {
        const AdamCoefficients<opmath_t> k = c;  // [note: invariants in locals]
        const int64_t first_index = base + i0;
        scalar_t* p = param_rows[s] + i0;
        float* pm = master != nullptr ? master + first_index : nullptr;
        state_t* m = exp_avg + first_index;
        state_t* v = exp_avg_sq + first_index;
        state_t* vmax = amsgrad ? max_exp_avg_sq + first_index : nullptr;
        with_grad_of(effective_grad, [&](const auto grad_of) {
          for_each_block<IO::kWidth>(n, [&](int64_t i, auto count) {
            // The random bits first: they depend on the index only, so they are computed
            // while the loads and the divides are in flight, not queued behind them.
            const bool stochastic = kMayRoundStochastically<scalar_t, state_t> && rounding.stochastic;
            BlockBits block_bits;
            if (stochastic) block_bits = BlockBits(rounding, first_index + i);
            const BlockBits* bits = stochastic ? &block_bits : nullptr;
            Vec p0, p1, g0, g1, m0, m1, v0, v1, x0, x1;
            prefetch_next_row(i, n, next);
            load_param(p + i, pm != nullptr ? pm + i : nullptr, p0, p1, count);
            IO::load(g + i, g0, g1, count);
            SIO::load(m + i, m0, m1, count);
            SIO::load(v + i, v0, v1, count);
            if constexpr (amsgrad) SIO::load(vmax + i, x0, x1, count);
            adam_update<amsgrad>(p0, grad_of(g0), m0, v0, x0, k);
            adam_update<amsgrad>(p1, grad_of(g1), m1, v1, x1, k);
            store_param(p + i, pm != nullptr ? pm + i : nullptr, p0, p1, bits, count);
            store_rounded(m + i, m0, m1, bits, 1, count);
            store_rounded(v + i, v0, v1, bits, 2, count);
            if constexpr (amsgrad) store_rounded(vmax + i, x0, x1, bits, 3, count);
          });
        });
      });
    });
  });
}

template <typename scalar_t, typename state_t, bool has_momentum, bool nesterov>
void sgd_kernel(const std::vector<scalar_t*>& param_rows, float* master, state_t* momentum_buffer, const std::vector<uint8_t>& first_step,
                const std::vector<GradSource<scalar_t>>& sources, const int64_t* seg,
                const RowSpace& space, double lr, double momentum, double dampening,
                double weight_decay, bool maximize, std::optional<at::opmath_type<scalar_t>> grad_scale,
                std::optional<at::opmath_type<scalar_t>> grad_multiplier, bool zero_grads, Rounding rounding) {
  using IO = VecIO<scalar_t>;
  using SIO = VecIO<state_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  static_assert(IO::kWidth == SIO::kWidth && std::is_same_v<opmath_t, typename SIO::opmath_t>);
  const EffectiveGrad<opmath_t> effective_grad = effective_grad_of(grad_scale, grad_multiplier, maximize);
  const auto c = sgd_coefficients<opmath_t>(lr, momentum, dampening, weight_decay);

  at::parallel_for(0, space.num_chunks(), 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) space.for_each_piece(chunk, [&](int64_t s, int64_t begin,
                                                                                       int64_t end) {
      const bool first_time = first_step[s] != 0;
      const int64_t base = seg[s * kSegmentColumns + kFlatOffset];
      const NextRow<scalar_t> next = next_row(param_rows, sources, s);
      for_each_contiguous_grad_block(sources[s], begin, end, zero_grads,
                                     [&](int64_t i0, int64_t n, const scalar_t* g) {
        const auto k = c;  // [note: invariants in locals]
        const bool first = first_time;
        const int64_t first_index = base + i0;
        scalar_t* p = param_rows[s] + i0;
        float* pm = master != nullptr ? master + first_index : nullptr;
        state_t* buf = has_momentum ? momentum_buffer + first_index : nullptr;
        with_grad_of(effective_grad, [&](const auto grad_of) {
          for_each_block<IO::kWidth>(n, [&](int64_t i, auto count) {
            const bool stochastic = kMayRoundStochastically<scalar_t, state_t> && rounding.stochastic;
            BlockBits block_bits;  // first, as in adam_kernel
            if (stochastic) block_bits = BlockBits(rounding, first_index + i);
            const BlockBits* bits = stochastic ? &block_bits : nullptr;
            Vec p0, p1, g0, g1, b0, b1;
            prefetch_next_row(i, n, next);
            load_param(p + i, pm != nullptr ? pm + i : nullptr, p0, p1, count);
            IO::load(g + i, g0, g1, count);
            if constexpr (has_momentum) SIO::load(buf + i, b0, b1, count);
            sgd_update<has_momentum, nesterov>(p0, grad_of(g0), b0, first, k);
            sgd_update<has_momentum, nesterov>(p1, grad_of(g1), b1, first, k);
            store_param(p + i, pm != nullptr ? pm + i : nullptr, p0, p1, bits, count);
            if constexpr (has_momentum) store_rounded(buf + i, b0, b1, bits, 1, count);
          });
        });
      });
    });
  });
}

// How values are rounded on store.
Rounding rounding_of(const std::optional<at::Tensor>& rounding_seed, bool has_master) {
  if (!rounding_seed.has_value()) return {false, 0};
  TORCH_CHECK(rounding_seed->numel() == 1 && rounding_seed->scalar_type() == at::kLong,
              "fusedopt: rounding_seed must be one int64");
  TORCH_CHECK(!has_master, "fusedopt: stochastic rounding and master_param exclude each other "
                           "(the param is the master's rounding to nearest)");
  return {true, rounding_key(rounding_seed->item<int64_t>())};
}

// In-kernel zeroing covers contiguous grads; a strided grad is zeroed whole here, after
// every thread has read it.
void zero_strided_grads(at::TensorList grads, bool flat_grads, bool zero_grads) {
  if (!zero_grads || flat_grads) return;
  for (const at::Tensor& g : grads)
    if (!g.is_contiguous()) const_cast<at::Tensor&>(g).zero_();
}

// A step GradScaler skips still owes the caller zeroed grads (else the overflowed
// values would accumulate into the next backward).
void zero_grads_of_skipped_step(at::TensorList grads, bool zero_grads) {
  if (!zero_grads) return;
  for (const at::Tensor& g : grads) const_cast<at::Tensor&>(g).zero_();
}

// Advances the counter of every parameter in the table (before its update reads it,
// as torch.optim does).
void advance_steps(at::Tensor& step, const int64_t* seg, int64_t num_segments) {
  float* steps = step.data_ptr<float>();
  for (int64_t s = 0; s < num_segments; ++s) steps[seg[s * kSegmentColumns + kParamIndex]] += 1.0f;
}

void adam_step_cpu(at::TensorList params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   const std::optional<at::Tensor>& max_exp_avg_sq, at::Tensor& step, at::TensorList grads,
                   const at::Tensor& segments, double lr, const std::optional<at::Tensor>& scheduled,
                   double beta1, double beta2, double weight_decay, double eps, bool decoupled_weight_decay,
                   bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_multiplier,
                   bool zero_grads, const std::optional<at::Tensor>& master_param,
                   const std::optional<at::Tensor>& rounding_seed) {
  const RowsCheck rows = check_rows(params, step, grads, segments);
  const at::ScalarType state_dtype = check_state_dtype(exp_avg, rows.dtype);
  check_flat(exp_avg, rows.device, state_dtype, rows.extent, "exp_avg");
  check_flat(exp_avg_sq, rows.device, state_dtype, rows.extent, "exp_avg_sq");
  const bool amsgrad = max_exp_avg_sq.has_value();
  if (amsgrad) check_flat(*max_exp_avg_sq, rows.device, state_dtype, rows.extent, "max_exp_avg_sq");
  float* master = check_master(master_param, rows.dtype, rows.device, rows.extent);
  const Rounding rounding = rounding_of(rounding_seed, master != nullptr);
  const std::array<double, 3> hyper = scheduled_values<3>({lr, beta1, beta2}, scheduled);  // lr, beta1, beta2
  if (skip_step(found_inf)) {
    zero_grads_of_skipped_step(grads, zero_grads);
    return;
  }

  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t num_segments = segments.size(0);
  advance_steps(step, seg, num_segments);
  const RowSpace space(seg, num_segments);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.dtype, "fusedopt::adam_step_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dispatch_state_dtype<scalar_t>(state_dtype, [&](auto* state_tag) {
      using state_t = std::remove_pointer_t<decltype(state_tag)>;
      auto run = [&](auto amsgrad_tag) {
        adam_kernel<scalar_t, state_t, decltype(amsgrad_tag)::value>(
            param_rows<scalar_t>(params, rows.flat_params, seg, num_segments), master,
            exp_avg.data_ptr<state_t>(), exp_avg_sq.data_ptr<state_t>(),
            amsgrad ? max_exp_avg_sq->data_ptr<state_t>() : nullptr, step.data_ptr<float>(),
            grad_sources<scalar_t>(grads, rows.flat_grads, seg, num_segments), seg, space, hyper[0], hyper[1],
            hyper[2], weight_decay, eps, decoupled_weight_decay, maximize, optional_scalar<opmath_t>(grad_scale),
            optional_scalar<opmath_t>(grad_multiplier), zero_grads, rounding);
      };
      amsgrad ? run(std::true_type{}) : run(std::false_type{});
    });
  });
  zero_strided_grads(grads, rows.flat_grads, zero_grads);
}

void sgd_step_cpu(at::TensorList params, const std::optional<at::Tensor>& momentum_buffer, at::Tensor& step,
                  at::TensorList grads, const at::Tensor& segments, double lr,
                  const std::optional<at::Tensor>& scheduled, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_multiplier,
                  bool zero_grads, const std::optional<at::Tensor>& master_param,
                  const std::optional<at::Tensor>& rounding_seed) {
  const RowsCheck rows = check_rows(params, step, grads, segments);
  const bool has_momentum = momentum_buffer.has_value();
  const at::ScalarType state_dtype = has_momentum ? check_state_dtype(*momentum_buffer, rows.dtype) : rows.dtype;
  if (has_momentum) check_flat(*momentum_buffer, rows.device, state_dtype, rows.extent, "momentum_buffer");
  float* master = check_master(master_param, rows.dtype, rows.device, rows.extent);
  const Rounding rounding = rounding_of(rounding_seed, master != nullptr);
  const std::array<double, 2> hyper = scheduled_values<2>({lr, momentum}, scheduled);  // lr, momentum
  if (skip_step(found_inf)) {
    zero_grads_of_skipped_step(grads, zero_grads);
    return;
  }

  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t num_segments = segments.size(0);
  std::vector<uint8_t> first_step(num_segments);
  const float* steps = step.data_ptr<float>();
  for (int64_t s = 0; s < num_segments; ++s)
    first_step[s] = steps[seg[s * kSegmentColumns + kParamIndex]] == 0.0f;
  // The counter records a started momentum buffer: a step without momentum starts none.
  if (has_momentum) advance_steps(step, seg, num_segments);
  const RowSpace space(seg, num_segments);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.dtype, "fusedopt::sgd_step_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto run = [&](auto* state_tag, auto momentum_tag, auto nesterov_tag) {
      using state_t = std::remove_pointer_t<decltype(state_tag)>;
      sgd_kernel<scalar_t, state_t, decltype(momentum_tag)::value, decltype(nesterov_tag)::value>(
          param_rows<scalar_t>(params, rows.flat_params, seg, num_segments), master,
          has_momentum ? momentum_buffer->data_ptr<state_t>() : nullptr, first_step,
          grad_sources<scalar_t>(grads, rows.flat_grads, seg, num_segments), seg, space, hyper[0],
          hyper[1], dampening, weight_decay, maximize, optional_scalar<opmath_t>(grad_scale),
          optional_scalar<opmath_t>(grad_multiplier), zero_grads, rounding);
    };
    if (!has_momentum) {
      run(static_cast<scalar_t*>(nullptr), std::false_type{}, std::false_type{});
      return;
    }
    dispatch_state_dtype<scalar_t>(state_dtype, [&](auto* state_tag) {
      if (nesterov) run(state_tag, std::true_type{}, std::true_type{});
      else run(state_tag, std::true_type{}, std::false_type{});
    });
  });
  zero_strided_grads(grads, rows.flat_grads, zero_grads);
}

// max that lets NaN through, as torch.max does.
inline double nan_max(double a, double b) { return (a != a || b != b) ? a + b : std::max(a, b); }

// Sum of |g|^p (or max |g| for p = inf) over one contiguous block: SIMD in opmath for
// the usual norms, finished in double.
template <typename scalar_t>
double block_norm_partial(const scalar_t* g, int64_t n, double norm_type) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  const bool is_inf = std::isinf(norm_type);
  double acc = 0.0;
  int64_t i = 0;
  if (is_inf || norm_type == 2.0) {
    Vec acc0(opmath_t(0)), acc1(opmath_t(0));
    for (; i + IO::kWidth <= n; i += IO::kWidth) {
      Vec g0, g1;
      IO::load(g + i, g0, g1);
      if (is_inf) {
        acc0 = at::vec::maximum(acc0, g0.abs());
        acc1 = at::vec::maximum(acc1, g1.abs());
      } else {
        acc0 = at::vec::fmadd(g0, g0, acc0);
        acc1 = at::vec::fmadd(g1, g1, acc1);
      }
    }
    opmath_t lanes[2 * Vec::size()];
    acc0.store(lanes);
    acc1.store(lanes + Vec::size());
    for (opmath_t lane : lanes) acc = is_inf ? nan_max(acc, lane) : acc + lane;
  }
  for (; i < n; ++i) {
    const double a = std::abs(static_cast<double>(static_cast<opmath_t>(g[i])));
    acc = is_inf ? nan_max(acc, a) : (norm_type == 2.0 ? acc + a * a : acc + std::pow(a, norm_type));
  }
  return acc;
}

at::Tensor grad_norm_cpu(at::TensorList grads, const at::Tensor& segments, double norm_type) {
  TORCH_CHECK(!grads.empty(), "fusedopt: grad_norm needs at least one grad");
  TORCH_CHECK(norm_type > 0.0, "fusedopt: norm_type must be positive, got ", norm_type);
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 &&
                  segments.size(1) == kSegmentColumns && segments.is_contiguous(),
              "fusedopt: segments must be a contiguous int64 [n, ", int64_t(kSegmentColumns), "] tensor");
  const int64_t num_segments = segments.size(0);
  const int64_t* seg = segments.data_ptr<int64_t>();
  const bool flat_grads = tensors_are_flat(static_cast<int64_t>(grads.size()), num_segments, grads[0].numel(),
                                           num_segments > 0 ? seg[kNumel] : -1);
  TORCH_CHECK(flat_grads ? grads[0].is_contiguous() : static_cast<int64_t>(grads.size()) == num_segments,
              "fusedopt: expected one contiguous flat grad buffer or one grad per segment");
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t* row = seg + s * kSegmentColumns;
    TORCH_CHECK(flat_grads ? row[kFlatOffset] + row[kNumel] <= grads[0].numel() : grads[s].numel() == row[kNumel],
                "fusedopt: segment ", s, " does not match its grad");
  }
  const bool is_inf = std::isinf(norm_type);
  const auto dtype = grads[0].scalar_type();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedopt::grad_norm", [&] {
    const RowSpace space(seg, num_segments);
    const auto sources = grad_sources<scalar_t>(grads, flat_grads, seg, num_segments);
    std::vector<double> partial(space.num_chunks());
    at::parallel_for(0, space.num_chunks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        double acc = 0.0;
        space.for_each_piece(chunk, [&](int64_t s, int64_t begin, int64_t end) {
          for_each_contiguous_grad_block(sources[s], begin, end, false, [&](int64_t, int64_t n, const scalar_t* g) {
            const double part = block_norm_partial(g, n, norm_type);
            acc = is_inf ? nan_max(acc, part) : acc + part;
          });
        });
        partial[chunk] = acc;
      }
    });
    for (double part : partial) total = is_inf ? nan_max(total, part) : total + part;
  });
  const double norm = is_inf ? total : (norm_type == 2.0 ? std::sqrt(total) : std::pow(total, 1.0 / norm_type));
  const auto out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(norm, at::TensorOptions().dtype(out_dtype));
}

}  // namespace
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_step_", &fusedopt::adam_step_cpu);
  m.impl("sgd_step_", &fusedopt::sgd_step_cpu);
  m.impl("grad_norm", &fusedopt::grad_norm_cpu);
}

// Each ISA variant is its own Python module (fusedopt._cpu_<isa>); importing it
// registers the kernels above.
#define FUSEDOPT_STRINGIFY_(x) #x
#define FUSEDOPT_STRINGIFY(x) FUSEDOPT_STRINGIFY_(x)
#define FUSEDOPT_CONCAT_(a, b) a##b
#define FUSEDOPT_MODULE_INIT(isa) FUSEDOPT_CONCAT_(PyInit__cpu_, isa)
extern "C" PyObject* FUSEDOPT_MODULE_INIT(FUSEDOPT_CPU_ISA)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cpu_" FUSEDOPT_STRINGIFY(FUSEDOPT_CPU_ISA),
                                          nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
