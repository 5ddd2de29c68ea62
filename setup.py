"""Builds torch_moe_lora and its compiled ops, the extension ``torch_moe_lora._C``, from ``csrc/``.

The C++ sources (``csrc/*.cpp``) are always built. The CUDA sources (``csrc/*.cu``) are added only
where the CUDA build can compile and link: torch built with CUDA, nvcc at ``CUDA_HOME/bin/nvcc``
and ``libcudart.so`` where the link looks for it (``CUDA_HOME/lib64``, ``CUDA_HOME/lib`` where
``lib64`` is missing, or the compiler's own library path such as ``LIBRARY_PATH``). ``CUDA_HOME`` is
torch's guess: the variable ``CUDA_HOME`` (or ``CUDA_PATH``), else two directories above the
``nvcc`` on ``PATH``, else ``/usr/local/cuda``; set it to the toolkit's root where the guess is
wrong. Otherwise the build is CPU-only, and ``TORCH_MOE_LORA_CPU_ONLY=1`` forces a CPU-only build.
The build prints one line, ``torch_moe_lora: CUDA build ...`` or ``torch_moe_lora: CPU-only build
...``, saying which and why (pip shows it with ``-v``). In the CUDA build the macro
``MOE_LORA_WITH_CUDA`` registers the CUDA kernels. Without ``TORCH_CUDA_ARCH_LIST`` the CUDA code
targets sm_90 with a compute_90 PTX fallback; with it, torch's own arch flags follow the list. The
C++ standard is the one the installed torch builds extensions with (``BuildExtension`` adds it):
C++20 for torch 2.13, whose headers need it; passing another standard than torch's own can break
the ABI between the two.

The library registers its ops with ``TORCH_LIBRARY`` and its Python module has no methods (no
pybind11), so it builds against the limited Python API: one binary serves every CPython >= 3.10.

The extension only loads with the torch it was built against. The build writes that version to
``torch_moe_lora/_build_info.py`` beside ``_C``, and ``import torch_moe_lora`` refuses an extension
built against another torch, naming the command that rebuilds it. ``pip install .`` builds in an
isolated environment holding a torch of its own (the newest that ``build-system.requires`` allows),
which matches what pip then installs in a fresh environment but not a torch installed before:
there, build against the installed torch with ``pip install --no-build-isolation .``.

Build: ``pip install .``, ``pip install --no-build-isolation -e .`` or ``python setup.py build_ext
--inplace``. Importing this file has no side effects (the tests import it); ``setup()`` runs when it
runs as a script, as pip and ``python setup.py`` run it.
"""

import glob
import os
import shlex
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_ONLY_VARIABLE = "TORCH_MOE_LORA_CPU_ONLY"
BUILD_INFO_MODULE = "_build_info.py"
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


def cpu_only_requested(environ=os.environ) -> bool:
    """Whether ``TORCH_MOE_LORA_CPU_ONLY`` asks for a CPU-only build: ``1`` yes; ``0`` or unset no."""
    value = environ.get(CPU_ONLY_VARIABLE, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{CPU_ONLY_VARIABLE} must be 1 (CPU-only build) or 0, not {value!r}")
    return value == "1"


def cuda_library_dir(cuda_home: str) -> str:
    """The directory torch's ``CUDAExtension`` passes to the linker (``-L``) for the CUDA libraries.

    torch's rule (``torch.utils.cpp_extension.library_paths``): ``CUDA_HOME/lib64``, or
    ``CUDA_HOME/lib`` where ``lib64`` does not exist and ``lib`` does.
    """
    lib64, lib = os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")
    return lib if not os.path.exists(lib64) and os.path.exists(lib) else lib64


def compiler_library(filename: str) -> str | None:
    """Path of ``filename`` in the C++ compiler's default library search path, or None where absent.

    That path (system directories, ``LIBRARY_PATH``) is where ``-lcudart`` resolves besides the
    ``-L`` directories: Debian's CUDA packages, for one, put ``libcudart.so`` there.
    """
    command = [*shlex.split(os.environ.get("CXX", "c++")), f"-print-file-name={filename}"]
    try:
        found = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return found if os.path.isabs(found) and os.path.isfile(found) else None


def choose_build(cpu_only: bool, torch_cuda: str | None, cuda_home: str | None, find_library=compiler_library):
    """Whether to build the CUDA sources, and one line saying which build and why.

    Args:
        cpu_only: ``TORCH_MOE_LORA_CPU_ONLY`` is set (``cpu_only_requested``).
        torch_cuda: ``torch.version.cuda`` of the torch built against: the CUDA version, or None.
        cuda_home: torch's ``CUDA_HOME`` guess (``torch.utils.cpp_extension.CUDA_HOME``), or None.
        find_library: looks a file name up in the compiler's default library path (``compiler_library``).

    Returns:
        ``(with_cuda, line)``: True where torch has CUDA, ``cuda_home/bin/nvcc`` exists and
        ``libcudart.so`` is in torch's CUDA ``-L`` directory or in the compiler's library path.
    """
    if cpu_only:
        return False, f"CPU-only build: {CPU_ONLY_VARIABLE}=1"
    if torch_cuda is None:
        return False, f"CPU-only build: torch {torch.__version__} is built without CUDA"
    if cuda_home is None:
        return False, "CPU-only build: no CUDA toolkit (CUDA_HOME unset, no nvcc on PATH, no /usr/local/cuda)"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return False, f"CPU-only build: CUDA_HOME is {cuda_home}, but {nvcc} does not exist"
    library_dir = cuda_library_dir(cuda_home)
    cudart = os.path.join(library_dir, "libcudart.so")
    if not os.path.isfile(cudart):
        cudart = find_library("libcudart.so")
    if cudart is None:
        return False, (
            f"CPU-only build: CUDA_HOME is {cuda_home} (nvcc there), but libcudart.so is neither in {library_dir} "
            "nor in the compiler's library path; set CUDA_HOME to the CUDA toolkit's root for a CUDA build"
        )
    return True, f"CUDA build: torch {torch.__version__} (CUDA {torch_cuda}), {nvcc}, {cudart}"


def compiled_extension(with_cuda: bool):
    """The ``torch_moe_lora._C`` extension: C++ and CUDA sources, or C++ only."""
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


class BuildExtensionRecordingTorch(BuildExtension):
    """torch's ``BuildExtension``, which also writes ``_build_info.py`` beside ``_C``.

    The module records the torch version the extension is built against: in the build directory,
    from which the wheel is made, and in the source package for in-place and editable builds.
    """

    def run(self):
        super().run()
        package_dirs = [os.path.join(self.build_lib, "torch_moe_lora")]
        if self.inplace:
            package_dirs.append(self.get_finalized_command("build_py").get_package_dir("torch_moe_lora"))
        record = (
            '"""The torch that torch_moe_lora._C was built against; written by setup.py, not tracked."""\n\n'
            f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        )
        for package_dir in package_dirs:
            os.makedirs(package_dir, exist_ok=True)
            with open(os.path.join(package_dir, BUILD_INFO_MODULE), "w") as file:
                file.write(record)


if __name__ == "__main__":
    with_cuda, build_line = choose_build(cpu_only_requested(), torch.version.cuda, CUDA_HOME)
    print(f"torch_moe_lora: {build_line}", flush=True)
    setup(
        packages=find_packages(include=["torch_moe_lora", "torch_moe_lora.*"]),
        ext_modules=[compiled_extension(with_cuda)],
        cmdclass={"build_ext": BuildExtensionRecordingTorch},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
