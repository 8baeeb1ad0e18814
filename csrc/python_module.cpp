// The `fusedopt._C` Python module: importing it registers the op schemas (ops.cpp)
// and, in CUDA builds, the CUDA kernels. It also holds the one piece of the per-step
// Python path that is a loop over every parameter, written in C so that a model with
// thousands of tensors does not pay ~0.4 us of interpreter time per tensor per step.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

// collect_grads(params, slot_addresses, grad_views) -> None | (rows, grads, flat, sparse)
//
// None: some parameter no longer points at its slot (the buffer is stale). Otherwise
// rows are the indices of the parameters that have a grad (None when all do), grads
// those grads in order, flat whether every one of them is the tensor in grad_views
// (a view of the flat grad buffer), sparse whether any is sparse.
PyObject* collect_grads(PyObject* /*module*/, PyObject* args) {
  PyObject *params, *addresses, *views;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &params, &PyList_Type, &addresses, &PyList_Type, &views))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyList_GET_SIZE(addresses) != n || PyList_GET_SIZE(views) != n) {
    PyErr_SetString(PyExc_ValueError, "collect_grads: params, slot_addresses and grad_views differ in length");
    return nullptr;
  }
  PyObject* grads = PyList_New(0);
  PyObject* rows = PyList_New(0);
  if (grads == nullptr || rows == nullptr) return nullptr;
  bool all_present = true, flat = true, sparse = false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(p)) {
      PyErr_SetString(PyExc_TypeError, "collect_grads: params must be tensors");
      Py_DECREF(grads);
      Py_DECREF(rows);
      return nullptr;
    }
    const at::Tensor& tensor = THPVariable_Unpack(p);
    const auto address = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    if (address != PyLong_AsSize_t(PyList_GET_ITEM(addresses, i))) {
      Py_DECREF(grads);
      Py_DECREF(rows);
      Py_RETURN_NONE;
    }
    const at::Tensor& grad = tensor.grad();
    if (!grad.defined()) {
      all_present = false;
      continue;
    }
    sparse = sparse || grad.is_sparse();
    PyObject* grad_object = THPVariable_Wrap(grad);  // the grad's own Python object
    flat = flat && grad_object == PyList_GET_ITEM(views, i);
    PyObject* index = PyLong_FromSsize_t(i);
    const bool failed = PyList_Append(grads, grad_object) != 0 || PyList_Append(rows, index) != 0;
    Py_DECREF(grad_object);
    Py_DECREF(index);
    if (failed) {
      Py_DECREF(grads);
      Py_DECREF(rows);
      return nullptr;
    }
  }
  if (all_present) {
    Py_DECREF(rows);
    rows = Py_NewRef(Py_None);
  }
  return Py_BuildValue("(NNOO)", rows, grads, flat ? Py_True : Py_False, sparse ? Py_True : Py_False);
}

PyMethodDef methods[] = {
    {"collect_grads", collect_grads, METH_VARARGS, "The grads of a flat buffer's parameters, read in one pass."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
