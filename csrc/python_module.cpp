// The `fusedopt._C` Python module: importing it registers the op schemas (ops.cpp)
// and, in CUDA builds, the CUDA kernels. It also holds the per-step check that
// fusedopt's flat buffers still describe torch.optim's public objects, a loop over every
// parameter written in C so that a model with thousands of tensors does not pay
// interpreter time per tensor per step, and the call of the step's op from C (call_op).
#include <Python.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/version.h>

#include "row_table.h"

namespace {

// state.get(p) without calling torch.Tensor.__hash__ (a Python method, id(self)): the
// hash of id(p) is the object's address. Borrowed reference; nullptr when absent.
PyObject* state_entry(PyObject* state, PyObject* p) {
#if PY_VERSION_HEX < 0x030D0000
  return _PyDict_GetItem_KnownHash(state, p, static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(p)));
#else
  return PyDict_GetItemWithError(state, p);
#endif
}

// const_data_ptr: the address without data_ptr()'s copy-on-write materialisation.
bool same_place(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type() && a.device() == b.device();
}

// Whether `entry` (opt.state[p], or nullptr) still holds exactly what fusedopt put there:
// `synced` is None (no state yet) or (entry, view, address, view, address, ...) in the
// order of `keys`; optimizer.py's NOT_ADOPTED, a 1-tuple of its own, matches no entry.
// Keys fusedopt does not manage are the user's and are not looked at.
PyObject* local_of(PyObject* t);

bool state_in_sync(PyObject* entry, PyObject* synced, PyObject* keys) {
  if (synced == Py_None) return entry == nullptr;
  if (entry != PyTuple_GET_ITEM(synced, 0) || !PyDict_Check(entry)) return false;
  const Py_ssize_t num_keys = PyTuple_GET_SIZE(keys);
  for (Py_ssize_t k = 0; k < num_keys; ++k) {
    PyObject* view = PyTuple_GET_ITEM(synced, 1 + 2 * k);
    if (PyDict_GetItemWithError(entry, PyTuple_GET_ITEM(keys, k)) != view) return false;
    PyObject* local = local_of(view);  // a DTensor's: its shard's
    if (local == nullptr) return false;
    const auto address = reinterpret_cast<uintptr_t>(THPVariable_Unpack(local).const_data_ptr());
    Py_DECREF(local);
    if (address != PyLong_AsSize_t(PyTuple_GET_ITEM(synced, 2 + 2 * k))) return false;
  }
  return true;
}

// [note: prefetching the check] Between two steps the kernel streams every parameter
// and state byte through the caches, so at the next check each row's objects are cache
// misses: the parameter's Python object and TensorImpl, its AutogradMeta, the grad's
// TensorImpl, the state entry and the tensors in it. One row's objects form a chain of
// dependent loads, and walking the rows one after another waits for each miss in turn
// (3000 small parameters: 0.5 to 0.75 ms of a 2.6 ms SGD step on a 2-core EPYC). So
// the check requests the rows ahead of it, one level of each row's chain per stage:
// many rows' misses are then in flight at once. The stages only load what the lists
// keep alive and only prefetch what they point to; the check itself reads every value
// again at its row, so a prefetch gone wrong costs a wasted request, never a result.
constexpr Py_ssize_t kRowsPerStage = 4;

inline void prefetch(const void* address, int lines = 1) {
  for (int k = 0; k < lines; ++k) __builtin_prefetch(static_cast<const char*>(address) + 64 * k, 0, 3);
}

// Whether an object is laid out as a tensor: its type is torch.Tensor or a subclass.
// THPVariable_Check asks isinstance() for anything but an exact torch.Tensor, a call
// through the metaclass's __instancecheck__ for every nn.Parameter (~30 ns a row here).
inline bool is_tensor_object(PyObject* object) {
  return THPVariable_CheckExact(object) ||
         (THPVariableClass != nullptr &&
          PyType_IsSubtype(Py_TYPE(object), reinterpret_cast<PyTypeObject*>(THPVariableClass)));
}

// The TensorImpl of a tensor's Python object; nullptr for any other object.
inline c10::TensorImpl* impl_of(PyObject* object) {
  return is_tensor_object(object) ? THPVariable_Unpack(object).unsafeGetTensorImpl() : nullptr;
}

// Stage `stage` (4: the farthest row ahead, 1: the next row) of row `i`'s prefetches.
// Each stage reads only what an earlier stage of the same row has requested.
void prefetch_row(PyObject* params, PyObject* views, PyObject* synced, bool check_state, Py_ssize_t i,
                  int stage) {
  PyObject* p = PyList_GET_ITEM(params, i);
  PyObject* s = check_state ? PyList_GET_ITEM(synced, i) : nullptr;
  const bool have_synced = s != nullptr && PyTuple_Check(s) && PyTuple_GET_SIZE(s) > 0;
  if (stage == 4) {
    prefetch(p);
    prefetch(PyList_GET_ITEM(views, i));
    if (s != nullptr) prefetch(s, 2);
    return;
  }
  if (stage == 3) {
    if (auto* impl = impl_of(p)) prefetch(impl, 4);
    if (auto* impl = impl_of(PyList_GET_ITEM(views, i))) prefetch(impl, 4);
    if (have_synced)
      for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(s); ++k) prefetch(PyTuple_GET_ITEM(s, k));
    return;
  }
  auto* impl = impl_of(p);
  auto* meta = impl != nullptr ? static_cast<torch::autograd::AutogradMeta*>(impl->autograd_meta()) : nullptr;
  if (stage == 2) {
    if (meta != nullptr) prefetch(&meta->grad_);
    if (have_synced) {
      PyObject* entry = PyTuple_GET_ITEM(s, 0);
      if (PyDict_Check(entry)) prefetch(reinterpret_cast<PyDictObject*>(entry)->ma_keys, 2);
      for (Py_ssize_t k = 1; k < PyTuple_GET_SIZE(s); k += 2)
        if (auto* view = impl_of(PyTuple_GET_ITEM(s, k))) prefetch(view, 4);
    }
    return;
  }
  if (meta != nullptr)
    if (auto* grad = meta->grad_.unsafeGetTensorImpl()) prefetch(grad, 4);
}

// What the kernels update for a parameter or grad object: a DTensor's local shard (its
// `_local_tensor`, as fusedopt/flat_buffer.py's local_of), else the tensor itself. New
// reference; nullptr with an exception set on failure.
PyObject* local_of(PyObject* t) {
  if (!THPVariable_Unpack(t).unsafeGetTensorImpl()->is_python_dispatch()) return Py_NewRef(t);
  PyObject* local = PyObject_GetAttrString(t, "_local_tensor");
  if (local == nullptr && PyErr_ExceptionMatches(PyExc_AttributeError)) {
    PyErr_Clear();  // another tensor subclass: its own memory
    return Py_NewRef(t);
  }
  if (local != nullptr && !is_tensor_object(local)) {
    Py_DECREF(local);
    PyErr_SetString(PyExc_TypeError, "sync_check: a DTensor's _local_tensor is not a tensor");
    return nullptr;
  }
  return local;
}

// Whether a DTensor grad is placed as its parameter (FSDP2 gives both one spec object).
// Plain tensors: true. -1 on error.
int same_placements(PyObject* p, PyObject* grad) {
  if (!THPVariable_Unpack(p).unsafeGetTensorImpl()->is_python_dispatch()) return 1;
  PyObject* mine = PyObject_GetAttrString(p, "placements");
  if (mine == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
    PyErr_Clear();
    return 1;
  }
  PyObject* theirs = PyObject_GetAttrString(grad, "placements");
  const int same = theirs == nullptr ? -1 : PyObject_RichCompareBool(mine, theirs, Py_EQ);
  Py_DECREF(mine);
  Py_XDECREF(theirs);
  return same;
}

// sync_check(params, views, grad_slots, state, keys, synced)
//     -> (stale, dirty, rows, grads, flat, bad)
//
// One pass over the rows of a flat buffer that one param group updates:
//   params      the parameters, in row order
//   views       per row, a tensor placed where fusedopt expects the parameter
//               (its slot in the flat buffer, or the parameter's own memory; for a
//               DTensor, its local shard, which is what this compares)
//   grad_slots  per row, the address of its slot in the flat grad buffer, or None
//   state       optimizer.state;  keys: the state keys fusedopt manages for the group
//   synced      per row, what fusedopt last put into state[p] (see state_in_sync)
// Returns: stale, the first row whose parameter is no longer where the view is (-1:
// none; the rest is then None); dirty, the rows whose state entry changed; rows, the
// rows that have a grad (None: all); grads, those grads (a DTensor's: its local shard);
// flat, whether every one of them lies at its grad slot with its parameter's strides;
// bad, the first row whose grad is sparse or differs from its parameter in dtype,
// device, shape or placements (-1: none).
PyObject* sync_check(PyObject* /*module*/, PyObject* args) {
  PyObject *params, *views, *grad_slots, *state, *keys, *synced;
  if (!PyArg_ParseTuple(args, "O!O!OO!O!O!", &PyList_Type, &params, &PyList_Type, &views, &grad_slots,
                        &PyDict_Type, &state, &PyTuple_Type, &keys, &PyList_Type, &synced))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const bool have_slots = grad_slots != Py_None;
  if (PyList_GET_SIZE(views) != n || PyList_GET_SIZE(synced) != n ||
      (have_slots && (!PyList_Check(grad_slots) || PyList_GET_SIZE(grad_slots) != n))) {
    PyErr_SetString(PyExc_ValueError, "sync_check: the per-row lists differ in length");
    return nullptr;
  }
  // rows is only built once a row without a grad shows up (the common step has them all).
  PyObject* dirty = PyList_New(0);
  PyObject* grads = PyList_New(n);
  PyObject* rows = nullptr;
  if (dirty == nullptr || grads == nullptr) {
    Py_XDECREF(dirty);
    Py_XDECREF(grads);
    return nullptr;
  }
  auto release = [&]() {
    Py_DECREF(dirty);
    Py_DECREF(grads);
    Py_XDECREF(rows);
  };
  auto fail = [&]() -> PyObject* {
    release();
    return nullptr;
  };
  auto append_index = [](PyObject* list, Py_ssize_t i) {
    PyObject* index = PyLong_FromSsize_t(i);
    const bool failed = index == nullptr || PyList_Append(list, index) != 0;
    Py_XDECREF(index);
    return !failed;
  };
  bool flat = have_slots;
  Py_ssize_t bad = -1, num_grads = 0;
  const bool check_state = PyTuple_GET_SIZE(keys) > 0;
  // Row r gets stage s at row r - s * kRowsPerStage of the loop; the first rows, here.
  for (int stage = 4; stage >= 1; --stage)
    for (Py_ssize_t r = 0; r < std::min<Py_ssize_t>(n, stage * kRowsPerStage); ++r)
      prefetch_row(params, views, synced, check_state, r, stage);
  for (Py_ssize_t i = 0; i < n; ++i) {
    for (int stage = 1; stage <= 4; ++stage)
      if (i + stage * kRowsPerStage < n)
        prefetch_row(params, views, synced, check_state, i + stage * kRowsPerStage, stage);
    PyObject* p = PyList_GET_ITEM(params, i);
    PyObject* view = PyList_GET_ITEM(views, i);
    if (!is_tensor_object(p) || !is_tensor_object(view)) {
      release();
      PyErr_SetString(PyExc_TypeError, "sync_check: params and views must be tensors");
      return nullptr;
    }
    const at::Tensor& tensor = THPVariable_Unpack(p);
    PyObject* local = local_of(p);
    if (local == nullptr) return fail();
    const bool in_place = same_place(THPVariable_Unpack(local), THPVariable_Unpack(view));
    Py_DECREF(local);
    if (!in_place) {
      release();
      return Py_BuildValue("(nOOOOn)", i, Py_None, Py_None, Py_None, Py_False, Py_ssize_t(-1));
    }
    if (check_state) {
      PyObject* entry = state_entry(state, p);
      if (entry == nullptr && PyErr_Occurred()) return fail();
      const bool in_sync = state_in_sync(entry, PyList_GET_ITEM(synced, i), keys);
      if (PyErr_Occurred()) return fail();
      if (!in_sync && !append_index(dirty, i)) return fail();
    }
    const at::Tensor& grad = tensor.grad();
    if (!grad.defined()) {
      if (rows == nullptr) {
        if ((rows = PyList_New(0)) == nullptr) return fail();
        for (Py_ssize_t j = 0; j < i; ++j)
          if (!append_index(rows, j)) return fail();
      }
      continue;
    }
    if (bad < 0 && (grad.layout() != at::kStrided || grad.scalar_type() != tensor.scalar_type() ||
                    grad.device() != tensor.device() || grad.sizes() != tensor.sizes()))
      bad = i;
    PyObject* wrapped = THPVariable_Wrap(grad);  // the grad's own Python object
    if (wrapped == nullptr) return fail();
    const int placed = bad < 0 ? same_placements(p, wrapped) : 1;
    PyObject* grad_object = placed < 0 ? nullptr : local_of(wrapped);
    Py_DECREF(wrapped);
    if (grad_object == nullptr) return fail();
    if (placed == 0) bad = i;
    if (flat) {
      const at::Tensor& read = THPVariable_Unpack(grad_object);
      const auto slot = PyLong_AsSize_t(PyList_GET_ITEM(grad_slots, i));
      flat = read.layout() == at::kStrided &&
             reinterpret_cast<uintptr_t>(read.const_data_ptr()) == slot && read.strides() == tensor.strides();
    }
    PyList_SET_ITEM(grads, num_grads++, grad_object);
    if (rows != nullptr && !append_index(rows, i)) return fail();
  }
  if (num_grads < n && PyList_SetSlice(grads, num_grads, n, nullptr) != 0) return fail();
  if (rows == nullptr) rows = Py_NewRef(Py_None);
  return Py_BuildValue("(nNNNOn)", Py_ssize_t(-1), dirty, rows, grads, flat ? Py_True : Py_False, bad);
}

// sole_owner(t): whether nothing but t sees its memory: no other tensor shares its
// storage, and the memory came from the device's allocator (not shared memory, a file
// mapping, numpy or DLPack). fusedopt moves a tensor into its own buffers only then.
// In C because asking from Python (t.untyped_storage()) itself leaves a reference:
// the Python storage object then lives as long as the storage does (torch's PyObject
// preservation) and counts as a user. One that nothing in Python holds any more is not
// another user of the memory, and is discounted: torch.compile asks for the storage of
// every parameter it traces, and fusedopt's first step often comes after that.
PyObject* sole_owner(PyObject* /*module*/, PyObject* arg) {
  if (!is_tensor_object(arg)) {
    PyErr_SetString(PyExc_TypeError, "sole_owner: expected a tensor");
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(arg);
  if (!t.has_storage()) Py_RETURN_FALSE;
  const c10::Storage& storage = t.storage();
  size_t users = storage.use_count();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  if (users == 2 && storage.unsafeGetStorageImpl()->pyobj_slot()->has_unique_reference()) users = 1;
#endif
  c10::Allocator* allocator = c10::GetAllocator(t.device().type());
  const bool owned = users == 1 && allocator != nullptr &&
                     storage.data_ptr().get_deleter() == allocator->raw_deleter();
  return PyBool_FromLong(owned);
}

// bump_versions(tensors): torch.autograd.graph.increment_version over a list, without
// a vector of Tensors (a reference count up and down per tensor) in between: a step
// bumps every parameter it updates, thousands per step on some models.
PyObject* bump_versions(PyObject* /*module*/, PyObject* tensors) {
  if (!PyList_Check(tensors)) {
    PyErr_SetString(PyExc_TypeError, "bump_versions: expected a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!is_tensor_object(PyList_GET_ITEM(tensors, i))) {
      PyErr_SetString(PyExc_TypeError, "bump_versions: expected a list of tensors");
      return nullptr;
    }
  }
  for (Py_ssize_t i = 0; i < n; ++i)
    torch::autograd::impl::bump_version(THPVariable_Unpack(PyList_GET_ITEM(tensors, i)));
  Py_RETURN_NONE;
}

// The tensors of a Python list, appended to `tensors`; false with a TypeError set if
// any item is not a tensor.
bool unpack_tensors(PyObject* list, std::vector<at::Tensor>& tensors) {
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    if (!is_tensor_object(PyList_GET_ITEM(list, i))) {
      PyErr_SetString(PyExc_TypeError, "expected lists of tensors");
      return false;
    }
    tensors.push_back(THPVariable_Unpack(PyList_GET_ITEM(list, i)));
  }
  return true;
}

// hold(tensors): an object holding a C++ reference to every tensor of a list, as long
// as it lives. [note: C++ references for op calls] A tensor that only its Python object
// holds flips between Python- and C++-owned whenever a C++ reference comes and goes
// (c10::intrusive_ptr: the 1 <-> 2 reference count transitions incref/decref the
// PyObject, each through pybind11's gil_scoped_acquire). An op called through torch.ops
// drops its arguments without the GIL, so each takes the GIL back: ~0.1 us per tensor,
// 0.3 ms per step for 3000 pinned rows (through call_op, whose op drops them alike,
// 3000 shared-memory parameters not held: 0.99 ms a call instead of 0.30). The per-row
// param lists fusedopt passes every step are held here once, and the op's
// references then never flip them.
PyObject* hold(PyObject* /*module*/, PyObject* tensors) {
  if (!PyList_Check(tensors)) {
    PyErr_SetString(PyExc_TypeError, "hold: expected a list of tensors");
    return nullptr;
  }
  auto held = std::make_unique<std::vector<at::Tensor>>();
  held->reserve(PyList_GET_SIZE(tensors));
  if (!unpack_tensors(tensors, *held)) return nullptr;
  PyObject* capsule = PyCapsule_New(held.get(), "fusedopt.held_tensors", [](PyObject* self) {
    delete static_cast<std::vector<at::Tensor>*>(PyCapsule_GetPointer(self, "fusedopt.held_tensors"));
  });
  if (capsule != nullptr) held.release();
  return capsule;
}

// huge_page_empty(numel, dtype): an uninitialised 1-d CPU tensor whose memory starts on a
// 2 MiB boundary, its whole 2 MiB pages advised as transparent huge pages (madvise
// MADV_HUGEPAGE, and MADV_DONTNEED first: memory malloc recycles is already backed by
// 4 KiB pages, which the advice alone would leave); its last partial 2 MiB, if any, stays
// on small pages, so it takes no more memory than torch.empty. Its storage is exactly its
// bytes (a checkpoint saves no padding). Off Linux: aligned, without the advice.
// flat_buffer.py's [note: huge pages] says why.
PyObject* huge_page_empty(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  Py_ssize_t numel;
  PyObject* dtype;
  if (!PyArg_ParseTuple(args, "nO!", &numel, &THPDtypeType, &dtype)) return nullptr;
  TORCH_CHECK(numel >= 0, "huge_page_empty: numel must not be negative");
  const at::ScalarType scalar_type = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(scalar_type);
  void* memory = nullptr;
  TORCH_CHECK(posix_memalign(&memory, kHugePage, std::max<size_t>(nbytes, 1)) == 0,
              "huge_page_empty: out of memory allocating ", nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t whole = nbytes / kHugePage * kHugePage;
  if (whole > 0 && madvise(memory, whole, MADV_DONTNEED) == 0) madvise(memory, whole, MADV_HUGEPAGE);
#endif
  at::Tensor t = at::from_blob(memory, {static_cast<int64_t>(numel)}, [](void* data) { free(data); },
                               at::TensorOptions().dtype(scalar_type));
  return THPVariable_Wrap(std::move(t));
  END_HANDLE_TH_ERRORS
}

// Test hooks of the CUDA kernels' per-row table (row_table.h), for tests/test_row_table.py
// only: the same code that builds the table and reads it on the device, run here on the
// host over CPU tensors, so a machine without a GPU checks its index math against torch.
//
//   _row_table(params, grads, segments) -> int64 tensor: the table's words
//   _row_walk(params, grads, segments) -> (rows, grad_addresses, param_addresses):
//       per position of the index space, the row a warp whose range begins there starts
//       at and the address of the grad element it reads there (-1: none, padding);
//       per row, the address of its first param element
//   _grad_offsets(grad, positions) -> (offsets, narrow): GradRef::offset of each
//       position for `grad` as a table row (any device, meta too: only its sizes and
//       strides are read), and whether that took the 32-bit path

// The RowTable of (params, grads, segments) as the CUDA kernels' plan_rows builds it.
bool parse_rows(PyObject* args, std::vector<at::Tensor>& params, std::vector<at::Tensor>& grads,
                at::Tensor& segments) {
  PyObject *params_list, *grads_list, *segments_object;
  if (!PyArg_ParseTuple(args, "O!O!O", &PyList_Type, &params_list, &PyList_Type, &grads_list, &segments_object) ||
      !unpack_tensors(params_list, params) || !unpack_tensors(grads_list, grads))
    return false;
  if (!is_tensor_object(segments_object)) {
    PyErr_SetString(PyExc_TypeError, "segments must be a tensor");
    return false;
  }
  segments = THPVariable_Unpack(segments_object);
  TORCH_CHECK(segments.device().is_cpu() && segments.scalar_type() == at::kLong && segments.is_contiguous() &&
                  segments.dim() == 2 && segments.size(1) == fusedopt::kSegmentColumns,
              "segments must be a contiguous CPU int64 tensor of shape (rows, ", fusedopt::kSegmentColumns, ")");
  return true;
}

at::Tensor long_tensor(const std::vector<int64_t>& values) {
  at::Tensor tensor = at::empty({static_cast<int64_t>(values.size())}, at::kLong);
  std::memcpy(tensor.data_ptr<int64_t>(), values.data(), values.size() * sizeof(int64_t));
  return tensor;
}

PyObject* row_table(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  std::vector<at::Tensor> params, grads;
  at::Tensor segments;
  if (!parse_rows(args, params, grads, segments)) return nullptr;
  return THPVariable_Wrap(long_tensor(fusedopt::build_row_table(params, grads, segments, false).words));
  END_HANDLE_TH_ERRORS
}

template <typename scalar_t>
void walk_rows(const fusedopt::RowWalk& walk, int64_t* rows, int64_t* grad_addresses, int64_t* param_addresses) {
  for (int64_t position = 0; position < walk.space; ++position) {
    const int64_t r = fusedopt::first_row_ending_after(walk, position);
    rows[position] = r;
    grad_addresses[position] = -1;
    if (r >= walk.num_segments) continue;
    const fusedopt::RowSpan<scalar_t> row = fusedopt::row_span<scalar_t>(walk, r);
    const int64_t j = position - row.start;
    if (j >= 0 && j < row.numel)
      grad_addresses[position] = reinterpret_cast<intptr_t>(row.grad.data + row.grad.offset(j));
  }
  for (int64_t r = 0; r < walk.num_segments; ++r) {
    const int64_t flat_offset = walk.segments[r * fusedopt::kSegmentColumns + fusedopt::kFlatOffset];
    param_addresses[r] = reinterpret_cast<intptr_t>(fusedopt::row_param<scalar_t>(walk, r, flat_offset));
  }
}

PyObject* row_walk(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  std::vector<at::Tensor> params, grads;
  at::Tensor segments;
  if (!parse_rows(args, params, grads, segments)) return nullptr;
  TORCH_CHECK(!params.empty() && !grads.empty(), "_row_walk needs params and grads");
  const fusedopt::RowTable table = fusedopt::build_row_table(params, grads, segments, false);
  const fusedopt::RowWalk walk = table.walk_at(table.words.data());
  at::Tensor rows = at::empty({walk.space}, at::kLong);
  at::Tensor grad_addresses = at::empty({walk.space}, at::kLong);
  at::Tensor param_addresses = at::empty({walk.num_segments}, at::kLong);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "_row_walk", [&] {
    walk_rows<scalar_t>(walk, rows.data_ptr<int64_t>(), grad_addresses.data_ptr<int64_t>(),
                        param_addresses.data_ptr<int64_t>());
  });
  return Py_BuildValue("(NNN)", THPVariable_Wrap(rows), THPVariable_Wrap(grad_addresses),
                       THPVariable_Wrap(param_addresses));
  END_HANDLE_TH_ERRORS
}

PyObject* grad_offsets(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *grad_object, *positions_object;
  if (!PyArg_ParseTuple(args, "OO", &grad_object, &positions_object)) return nullptr;
  if (!is_tensor_object(grad_object) || !is_tensor_object(positions_object)) {
    PyErr_SetString(PyExc_TypeError, "_grad_offsets(grad, positions) takes two tensors");
    return nullptr;
  }
  const at::Tensor& grad = THPVariable_Unpack(grad_object);
  const at::Tensor positions = THPVariable_Unpack(positions_object).to(at::kLong).contiguous();
  TORCH_CHECK(positions.device().is_cpu(), "positions must be a CPU tensor");
  std::vector<int64_t> words;
  fusedopt::append_grad_rows({grad}, 1, words);
  fusedopt::RowWalk walk{};
  walk.num_segments = 1;
  walk.table = words.data();
  // Only the element offset is read, which does not depend on the element type.
  const fusedopt::GradRef<char> ref = fusedopt::table_grad<char>(walk, fusedopt::table_row(walk, 0), 0);
  at::Tensor offsets = at::empty({positions.numel()}, at::kLong);
  for (int64_t i = 0; i < positions.numel(); ++i)
    offsets.data_ptr<int64_t>()[i] = ref.offset(positions.data_ptr<int64_t>()[i]);
  return Py_BuildValue("(NO)", THPVariable_Wrap(offsets), ref.narrow ? Py_True : Py_False);
  END_HANDLE_TH_ERRORS
}

// same_items(a, b): whether two sequences hold the same objects in the same order (by
// identity, never calling __eq__, which for tensors compares elements). The per-step
// test that a param group's params are those its plan was made for.
PyObject* same_items(PyObject* /*module*/, PyObject* args) {
  PyObject *a, *b;
  if (!PyArg_ParseTuple(args, "OO", &a, &b)) return nullptr;
  // Lists as they are; any other sequence (a tuple assigned to a group's "params") copied.
  PyObject* fast_a = PySequence_Fast(a, "same_items: expected sequences");
  if (fast_a == nullptr) return nullptr;
  PyObject* fast_b = PySequence_Fast(b, "same_items: expected sequences");
  if (fast_b == nullptr) {
    Py_DECREF(fast_a);
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast_a);
  bool same = PySequence_Fast_GET_SIZE(fast_b) == n;
  for (Py_ssize_t i = 0; same && i < n; ++i)
    same = PySequence_Fast_GET_ITEM(fast_a, i) == PySequence_Fast_GET_ITEM(fast_b, i);
  Py_DECREF(fast_a);
  Py_DECREF(fast_b);
  return PyBool_FromLong(same);
}

// call_op(name, args): torch.ops.<name>(*args) for an op that returns nothing, called
// from C; NotImplemented (nothing called) when an argument is a tensor of another type
// than torch.Tensor or nn.Parameter, whose __torch_function__ torch.ops would consult.
// [note: op calls from C] torch's Python binding converts a list argument one tensor
// at a time (a type check and a __torch_function__ scan per item), and autograd's
// fallback then walks every tensor of the call for requires_grad. This converts each
// list in one C loop and runs the kernel below autograd (fusedopt's step runs under
// no_grad and bumps versions itself; fusedopt/ops.py's `run` calls this only then):
// 3000 shared-memory parameters (held: [note: C++ references for op calls]) and their
// grads, a call that returns before the kernel: 0.30-0.32 ms instead of 0.40-0.43 on
// this project's 2-core EPYC.
PyObject* call_op(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* name;
  PyObject* op_args;
  if (!PyArg_ParseTuple(args, "sO!", &name, &PyTuple_Type, &op_args)) return nullptr;
  static PyObject* parameter_type = [] {
    PyObject* module = PyImport_ImportModule("torch.nn.parameter");
    PyObject* type = module != nullptr ? PyObject_GetAttrString(module, "Parameter") : nullptr;
    Py_XDECREF(module);
    return type;  // kept for the life of the process
  }();
  if (parameter_type == nullptr) return nullptr;
  auto plain = [&](PyObject* object) {
    return THPVariable_CheckExact(object) || Py_TYPE(object) == reinterpret_cast<PyTypeObject*>(parameter_type);
  };
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  const auto& arguments = op.schema().arguments();
  const Py_ssize_t given = PyTuple_GET_SIZE(op_args);
  TORCH_CHECK(op.schema().returns().empty() && given <= static_cast<Py_ssize_t>(arguments.size()),
              "call_op: ", name, " returns a value or takes fewer than ", given, " arguments");
  torch::jit::Stack stack;
  stack.reserve(arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (static_cast<Py_ssize_t>(i) >= given) {
      TORCH_CHECK(arguments[i].default_value().has_value(), "call_op: ", name, " needs ", arguments[i].name());
      stack.push_back(*arguments[i].default_value());
      continue;
    }
    PyObject* item = PyTuple_GET_ITEM(op_args, i);
    if (PyList_Check(item) && arguments[i].type()->kind() == c10::TypeKind::ListType) {
      const Py_ssize_t n = PyList_GET_SIZE(item);
      c10::List<at::Tensor> list;
      list.reserve(n);
      for (Py_ssize_t k = 0; k < n; ++k) {
        PyObject* t = PyList_GET_ITEM(item, k);
        if (!plain(t)) Py_RETURN_NOTIMPLEMENTED;
        list.push_back(THPVariable_Unpack(t));
      }
      stack.emplace_back(std::move(list));
      continue;
    }
    if (is_tensor_object(item) && !plain(item)) Py_RETURN_NOTIMPLEMENTED;
    stack.push_back(torch::jit::toIValue(item, arguments[i].type()));
  }
  {
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.callBoxed(&stack);  // drops the arguments
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"sync_check", sync_check, METH_VARARGS,
     "Checks a flat buffer's rows against the public parameters, state and grads in one pass."},
    {"sole_owner", sole_owner, METH_O, "Whether nothing but this tensor sees its memory."},
    {"same_items", same_items, METH_VARARGS, "Whether two sequences hold the same objects, in order."},
    {"bump_versions", bump_versions, METH_O, "Increments the autograd version of every tensor in a list."},
    {"hold", hold, METH_O, "An object that holds a C++ reference to every tensor of a list while it lives."},
    {"huge_page_empty", huge_page_empty, METH_VARARGS,
     "An uninitialised 1-d CPU tensor on a 2 MiB boundary, its whole 2 MiB pages advised as huge pages."},
    {"call_op", call_op, METH_VARARGS, "torch.ops.<name>(*args) of an op returning nothing, called from C."},
    {"_row_table", row_table, METH_VARARGS, "Test hook: the CUDA kernels' per-row table, built on the host."},
    {"_row_walk", row_walk, METH_VARARGS, "Test hook: the CUDA kernels' reading of the per-row table, on the host."},
    {"_grad_offsets", grad_offsets, METH_VARARGS, "Test hook: the CUDA kernels' element offsets of a strided grad."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  // For the test hooks: the layout of the per-row table.
  if (module != nullptr && (PyModule_AddIntConstant(module, "_ROW_PAD", fusedopt::kRowPad) != 0 ||
                            PyModule_AddIntConstant(module, "_ROW_WORDS", fusedopt::kRowWords) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
