"""Build script: maps the repository folders into ONE import package and picks extensions.

* ``pyglue/``  -> ``diffkern``          (Python API, dispatch, references, methods, CLI)
* ``kernels/`` -> ``diffkern.kernels``  (Triton kernels)
* ``csrc/``    -> ``diffkern._C``       (C++ CPU ops; CUDA ops too when built with a CUDA torch)

Knobs (environment variables):

* ``DIFFKERN_NO_EXT=1``   pure-Python install: everything runs on the reference backend.
* ``FORCE_CUDA=1`` / ``TORCH_CUDA_ARCH_LIST`` / a visible GPU: also build ``csrc/cuda``
  (needs a CUDA build of torch). Default archs without a visible GPU: ``8.0;9.0+PTX``.
* ``DIFFKERN_NATIVE=1``   add ``-march=native`` (local experiments only, never shipped).
* ``MAX_JOBS``            parallel compile jobs (torch's BuildExtension honours it).

torch is imported only here, at build time, and only if it is already installed: build with
``pip install --no-build-isolation .`` so the installed (pinned) torch is used.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _package_map():
    packages = {"diffkern": "pyglue", "diffkern.kernels": "kernels"}
    for sub in find_packages(os.path.join(ROOT, "pyglue")):
        packages["diffkern." + sub] = "pyglue/" + sub.replace(".", "/")
    return packages


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    """Return (ext_modules, cmdclass); an empty list means a pure-Python install."""
    if _flag("DIFFKERN_NO_EXT"):
        print("diffkern: DIFFKERN_NO_EXT=1 -> pure-Python install (reference backend only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("diffkern: torch is not importable at build time -> pure-Python install "
              "(reference backend only); build with --no-build-isolation to get the C++ ops")
        return [], {}

    # -fopenmp-simd: the `omp simd` loops vectorise without the OpenMP runtime; -fno-trapping-math:
    # GCC if-converts float selects (csrc/include/diffkern/vec_math.h); -fno-math-errno: sqrt is an
    # instruction, not a call that may set errno (nothing here reads errno)
    cxx = ["-O3", "-std=c++20", "-ffp-contract=fast", "-fvisibility=hidden", "-fopenmp-simd", "-fno-trapping-math",
           "-fno-math-errno"]
    if "OpenMP" in torch.__config__.parallel_info():
        cxx.append("-fopenmp")  # only when torch itself uses OpenMP (as xformers does)
    if _flag("DIFFKERN_NATIVE"):
        cxx.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))

    want_cuda = bool(torch.version.cuda) and (
        _flag("FORCE_CUDA") or torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST")))
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/binding*.cpp"))
        ext = cpp_extension.CUDAExtension(
            "diffkern._C", sources, include_dirs=include_dirs,
            define_macros=[("DIFFKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]})
    else:
        ext = cpp_extension.CppExtension(
            "diffkern._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})
    print(f"diffkern: building diffkern._C ({'CPU+CUDA' if want_cuda else 'CPU'}) "
          f"against torch {torch.__version__}")
    build_ext = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
package_map = _package_map()

setup(
    packages=sorted(package_map),
    package_dir=package_map,
    package_data={"diffkern": ["assets/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
