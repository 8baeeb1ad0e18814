"""Builds fusedopt's extensions ahead of time: `pip install --no-build-isolation -e .`

* `fusedopt._C`: the op schemas, plus the CUDA kernels when this is a CUDA build.
* `fusedopt._cpu_{default,avx2,avx512,avx512_bf16}`: the CPU kernels, compiled once per
  x86 ISA level; fusedopt/ops.py loads the best one the running CPU supports, so a wheel built
  here runs on any x86-64 CPU (no -march=native).

CUDA kernels are built when torch is a CUDA build and a toolkit is found, never
depending on a visible GPU, so a GPU-less CI machine still compiles and links them.

The modules link against the exact torch they were compiled with (its C++ ABI and, in
a CUDA build, libc10_cuda.so), so the package's metadata pins that torch and
`fusedopt/_build_info.py` records it for fusedopt/ops.py to check at import.
"""
import glob
import os
import platform
from importlib import metadata

import torch
from setuptools import setup

# torch looks for the toolkit via CUDA_HOME, then `which nvcc`; an nvcc on PATH outside a
# toolkit (e.g. /usr/local/bin/nvcc) makes it pick a CUDA_HOME without libcudart. Prefer
# the conventional toolkit location unless the user chose one. (Must precede the import.)
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# -g0: Python's CFLAGS carry -g, which made each module ~12x its stripped size.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-g0"]

# Flags of ATen's own per-ISA builds; CPU_CAPABILITY picks at::vec's implementation.
CPU_VARIANTS = {"default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
if platform.machine() in ("x86_64", "AMD64"):
    CPU_VARIANTS["avx2"] = ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                            "-mavx2", "-mfma", "-mf16c"]
    CPU_VARIANTS["avx512"] = ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                              "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    # AVX512 plus the bfloat16 conversion instructions (Cooper Lake, Sapphire Rapids,
    # Zen 4 and later): at::vec's AVX512 code, fusedopt's bf16 stores by vcvtne2ps2bf16.
    CPU_VARIANTS["avx512_bf16"] = [*CPU_VARIANTS["avx512"], "-mavx512bf16", "-DFUSEDOPT_AVX512_BF16"]


def cuda_build_wanted():
    if os.environ.get("FUSEDOPT_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_include_dirs():
    # The CUDA build of torch ships the math-library headers (cusparse.h, ...) that a
    # minimal toolkit such as /usr/local/cuda on these machines lacks.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def extensions():
    csrc = os.path.join("csrc")
    exts = []
    for name, flags in CPU_VARIANTS.items():
        exts.append(CppExtension(
            f"fusedopt._cpu_{name}",
            ["csrc/cpu/optimizer_kernels.cpp"],
            include_dirs=[os.path.join(ROOT, csrc)],
            # ATen's parallel_for is OpenMP inlined from its header: without -fopenmp it
            # runs on one thread. The library resolves to the libgomp torch already loaded.
            extra_compile_args={"cxx": CXX_FLAGS + flags + ["-fopenmp", f"-DFUSEDOPT_CPU_ISA={name}"]},
            extra_link_args=["-fopenmp"],
        ))
    if cuda_build_wanted():
        # No GPU to ask: default to Ampere and Hopper (plus Hopper PTX, so newer GPUs
        # can JIT it) unless the user names archs.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        exts.append(CUDAExtension(
            "fusedopt._C",
            ["csrc/ops.cpp", "csrc/python_module.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))],
            include_dirs=[os.path.join(ROOT, csrc), *cuda_include_dirs()],
            extra_compile_args={"cxx": CXX_FLAGS,
                                "nvcc": ["-O3"]},
            define_macros=[("FUSEDOPT_WITH_CUDA", None)],
        ))
    else:
        exts.append(CppExtension("fusedopt._C", ["csrc/ops.cpp", "csrc/python_module.cpp"],
                                 extra_compile_args={"cxx": CXX_FLAGS}))
    return exts


BUILD_INFO = f"""\
# Written by setup.py with the extension modules beside it: the torch they were built
# against. fusedopt/ops.py refuses to load them under another torch.
TORCH_VERSION = {torch.__version__!r}
TORCH_CUDA = {torch.version.cuda!r}
"""


class BuildExtensionWithInfo(BuildExtension.with_options(use_ninja=True)):
    def run(self):
        super().run()
        # Beside the modules: the source tree for in-place and editable builds, else the
        # build folder a wheel is made from.
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("fusedopt._C")), "_build_info.py")
        with open(path, "w") as info:
            info.write(BUILD_INFO)


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionWithInfo},
    install_requires=[f"torch=={metadata.version('torch')}", "tqdm", "matplotlib"],
)
