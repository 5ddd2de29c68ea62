"""Builds torch_moe_lora and its compiled ops, the extension ``torch_moe_lora._C``, from ``csrc/``.

The C++ sources (``csrc/*.cpp``) are always built. The CUDA sources (``csrc/*.cu``) are added when
torch was built with CUDA and nvcc is found (``CUDA_HOME``); the macro ``MOE_LORA_WITH_CUDA`` then
registers the CUDA kernels. Without ``TORCH_CUDA_ARCH_LIST`` the CUDA code targets sm_90 with a
compute_90 PTX fallback; with it, torch's own arch flags follow the list. The C++ standard is the one
the installed torch builds extensions with (``BuildExtension`` adds it): C++20 for torch 2.13, whose
headers need it; passing another standard than torch's own can break the ABI between the two.

The library registers its ops with ``TORCH_LIBRARY`` and its Python module has no methods (no
pybind11), so it builds against the limited Python API: one binary serves every CPython >= 3.10.

Build: ``pip install --no-build-isolation -e .`` or ``python setup.py build_ext --inplace``.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def csrc_files(*patterns: str) -> list[str]:
    """Sorted paths, relative to the repository root, of the ``csrc/`` files matching ``patterns``.

    Each source compiles to an object file named by its stem, so ``a.cpp`` and ``a.cu`` would
    collide ("multiple rules generate a.o"): two sources with one stem are an error here.
    """
    names = sorted(name for pattern in patterns for name in glob.glob(pattern, root_dir=os.path.join(ROOT, "csrc")))
    stems = [os.path.splitext(name)[0] for name in names]
    clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clashes:
        raise ValueError(f"csrc/ sources must have distinct stems; shared by several files: {clashes}")
    return [os.path.join("csrc", name) for name in names]


def compiled_extension():
    """The ``torch_moe_lora._C`` extension: CUDA when torch and the toolkit allow, else C++ only."""
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    cxx_flags = ["-O3"]
    if not with_cuda:
        return CppExtension(
            "torch_moe_lora._C",
            csrc_files("*.cpp"),
            extra_compile_args={"cxx": cxx_flags},
            py_limited_api=True,
        )
    arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_CUDA_ARCH_FLAGS
    return CUDAExtension(
        "torch_moe_lora._C",
        csrc_files("*.cpp", "*.cu"),
        define_macros=[("MOE_LORA_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", *arch_flags]},
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["torch_moe_lora", "torch_moe_lora.*"]),
    ext_modules=[compiled_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
