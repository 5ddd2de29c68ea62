"""Installs as users type them: which build ``setup.py`` chooses, and what a mismatched ``_C`` says.

Reproduces the install problems of a fresh environment without a GPU or a CUDA torch: pip's
isolated build installs a CUDA torch and ``setup.py`` used to build CUDA wherever an ``nvcc`` was
found (``ld: cannot find -lcudart`` where the CUDA libraries are not where torch guesses); an
extension built against one torch and loaded with another; the README's install commands.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_script():
    """``setup.py`` imported as a module (``setup()`` runs only as a script)."""
    spec = importlib.util.spec_from_file_location("setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_cuda_home(path: Path, nvcc: bool = True, library_dir: str | None = None) -> Path:
    """A directory laid out like a CUDA toolkit: ``bin/nvcc`` (a script that fails when run) and
    ``libcudart.so`` (empty) in ``library_dir``."""
    if nvcc:
        (path / "bin").mkdir(parents=True)
        (path / "bin" / "nvcc").write_text("#!/bin/sh\necho 'fake nvcc: not a CUDA toolkit' >&2\nexit 1\n")
        (path / "bin" / "nvcc").chmod(stat.S_IRWXU)
    if library_dir is not None:
        (path / library_dir).mkdir(parents=True, exist_ok=True)
        (path / library_dir / "libcudart.so").write_bytes(b"")
    return path


def not_in_compiler_path(filename: str) -> None:
    return None


@pytest.mark.parametrize("library_dir", ["lib64", "lib"])
def test_cuda_build_where_nvcc_and_cudart_are_there(setup_script, tmp_path, library_dir):
    home = fake_cuda_home(tmp_path / "cuda", library_dir=library_dir)
    with_cuda, line = setup_script.choose_build(False, "13.0", str(home), find_library=not_in_compiler_path)
    print(line)
    assert with_cuda
    assert line.startswith("CUDA build:") and str(home / library_dir / "libcudart.so") in line


def test_cuda_build_where_cudart_is_in_the_compiler_path(setup_script, tmp_path):
    """Debian's CUDA packages: nvcc under CUDA_HOME=/usr, ``libcudart.so`` in a system library dir."""
    home = fake_cuda_home(tmp_path / "usr")
    system_cudart = str(fake_cuda_home(tmp_path / "system", nvcc=False, library_dir="lib") / "lib" / "libcudart.so")
    with_cuda, line = setup_script.choose_build(False, "13.0", str(home), find_library=lambda name: system_cudart)
    assert with_cuda and system_cudart in line


def test_nvcc_without_cudart_builds_cpu_only(setup_script, tmp_path):
    """The fresh-venv failure: an ``nvcc`` on PATH whose toolkit keeps libcudart.so elsewhere."""
    home = fake_cuda_home(tmp_path / "usr_local")
    (home / "lib").mkdir()  # torch then links with -L CUDA_HOME/lib, which has no libcudart.so
    with_cuda, line = setup_script.choose_build(False, "13.0", str(home), find_library=not_in_compiler_path)
    print(line)
    assert not with_cuda
    assert line.startswith("CPU-only build:") and f"libcudart.so is neither in {home / 'lib'}" in line


@pytest.mark.parametrize(
    "torch_cuda, nvcc, reason",
    [(None, True, "is built without CUDA"), ("13.0", None, "no CUDA toolkit"), ("13.0", False, "does not exist")],
)
def test_cpu_only_build_without_cuda_torch_or_toolkit(setup_script, tmp_path, torch_cuda, nvcc, reason):
    home = None if nvcc is None else str(fake_cuda_home(tmp_path / "cuda", nvcc=nvcc, library_dir="lib64"))
    with_cuda, line = setup_script.choose_build(False, torch_cuda, home, find_library=lambda name: "/usr/lib/x.so")
    assert not with_cuda and line.startswith("CPU-only build:") and reason in line


@pytest.mark.parametrize(
    "environ, cpu_only",
    [({"TORCH_MOE_LORA_CPU_ONLY": "1"}, True), ({"TORCH_MOE_LORA_CPU_ONLY": "0"}, False), ({}, False)],
)
def test_cpu_only_switch(setup_script, environ, cpu_only):
    assert setup_script.cpu_only_requested(environ) is cpu_only


def test_cpu_only_switch_refuses_other_values(setup_script):
    with pytest.raises(ValueError, match="TORCH_MOE_LORA_CPU_ONLY must be 1"):
        setup_script.cpu_only_requested({"TORCH_MOE_LORA_CPU_ONLY": "yes"})


def test_cpu_only_switch_wins_over_a_complete_toolkit(setup_script, tmp_path):
    home = fake_cuda_home(tmp_path / "cuda", library_dir="lib64")
    assert setup_script.choose_build(True, "13.0", str(home)) == (False, "CPU-only build: TORCH_MOE_LORA_CPU_ONLY=1")


@pytest.mark.parametrize("layout", [["lib64"], ["lib"], ["lib64", "lib"], []])
def test_cuda_library_dir_is_torchs(setup_script, tmp_path, monkeypatch, layout):
    """The directory checked for libcudart.so is the one torch's CUDAExtension links with."""
    for name in layout:
        (tmp_path / name).mkdir()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert setup_script.cuda_library_dir(str(tmp_path)) in cpp_extension.library_paths(device_type="cuda")


# Runs setup.py as pip's isolated build runs it on a machine without the CUDA libraries: torch
# reports CUDA (as the CUDA torch pip installs there does), and CUDA_HOME is torch's own guess from
# the nvcc first on PATH. The old setup.py built the CUDA sources there and failed.
SETUP_WITH_CUDA_TORCH = textwrap.dedent(
    """
    import runpy, sys
    import torch
    import torch.utils.cpp_extension as cpp_extension
    torch.version.cuda = "13.0"
    cpp_extension.CUDA_HOME = cpp_extension._find_cuda_home()
    sys.argv = ["setup.py", *sys.argv[1:]]
    runpy.run_path("setup.py", run_name="__main__")
    """
)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout[-3000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def built_checkout(setup_script, tmp_path_factory):
    """A copy of the repository with ``_C`` built in place by setup.py under a CUDA torch whose only
    toolkit is an ``nvcc`` on PATH without libraries, and what the build printed."""
    if setup_script.compiler_library("libcudart.so"):
        pytest.skip("this machine's compiler finds a libcudart.so of its own")
    base = tmp_path_factory.mktemp("install")
    checkout = base / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py", "build", "*.egg-info")
    for directory in ["csrc", "torch_moe_lora"]:
        shutil.copytree(ROOT / directory, checkout / directory, ignore=ignore)
    for file in ["setup.py", "pyproject.toml", "README.md"]:
        shutil.copy(ROOT / file, checkout / file)
    nvcc_dir = fake_cuda_home(base / "usr_local") / "bin"
    env = {**os.environ, "PATH": f"{nvcc_dir}{os.pathsep}{os.environ['PATH']}"}
    for name in ["CUDA_HOME", "CUDA_PATH", "TORCH_MOE_LORA_CPU_ONLY"]:
        env.pop(name, None)
    done = run([sys.executable, "-c", SETUP_WITH_CUDA_TORCH, "build_ext", "--inplace"], checkout, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return checkout, done.stdout


def import_package(checkout: Path) -> subprocess.CompletedProcess:
    """Imports the checkout's torch_moe_lora in a fresh interpreter; prints whether the op has kernels."""
    code = (
        "import torch, torch_moe_lora\n"
        "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
        "print('kernels:', has('moe_lora::align_block_size', 'CPU'), has('moe_lora::align_block_size', 'CUDA'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return run([sys.executable, "-c", code], checkout, env)


def test_build_with_nvcc_but_no_cuda_libraries_is_cpu_only_and_loads(built_checkout):
    checkout, build_log = built_checkout
    assert re.search(r"^torch_moe_lora: CPU-only build: .*libcudart\.so is neither in", build_log, flags=re.M)
    record = (checkout / "torch_moe_lora" / "_build_info.py").read_text()
    assert f"TORCH_VERSION = {str(torch.__version__)!r}" in record
    done = import_package(checkout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels: True False" in done.stdout  # the CPU kernel registered, no CUDA one


def test_extension_built_against_another_torch_is_refused(built_checkout, tmp_path):
    """What an isolated build against a newer torch than the installed one leaves behind."""
    checkout = tmp_path / "checkout"
    shutil.copytree(built_checkout[0], checkout, ignore=shutil.ignore_patterns("build"))
    (checkout / "torch_moe_lora" / "_build_info.py").write_text('TORCH_VERSION = "2.99.0+cu130"\n')
    done = import_package(checkout)
    assert done.returncode != 0
    assert f"built against torch 2.99.0+cu130, but torch {torch.__version__} is installed" in done.stderr
    assert f"-m pip install --no-build-isolation -e {checkout}" in done.stderr


def test_extension_that_does_not_load_names_the_rebuild_command(built_checkout, tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(built_checkout[0], checkout, ignore=shutil.ignore_patterns("build"))
    (extension,) = (checkout / "torch_moe_lora").glob("_C*.so")
    extension.write_bytes(b"not a shared library")
    done = import_package(checkout)
    assert done.returncode != 0
    assert f"could not be loaded with torch {torch.__version__}" in done.stderr
    assert f"-m pip install --no-build-isolation -e {checkout}" in done.stderr


def test_readme_install_section(setup_script):
    """``## Install`` follows ``## Run it`` and gives the commands, the switch and the CUDA needs."""
    headings = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), flags=re.M)
    assert headings[headings.index("Run it") + 1] == "Install"
    section = (ROOT / "README.md").read_text().split("## Install\n", 1)[1].split("\n## ", 1)[0]
    for text in [
        "pip install .",
        "pip install -e .",
        "pip install --no-build-isolation",
        f"{setup_script.CPU_ONLY_VARIABLE}=1",
        "CUDA_HOME",
        "libcudart.so",
    ]:
        assert text in section, text


def test_sdist_carries_every_source_file(tmp_path):
    """A source distribution holds every file of ``csrc/`` (headers and CUDA sources too), so that it
    builds where it is unpacked."""
    tree = tmp_path / "tree"
    junk = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".*")
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*junk))
    env = {**os.environ, "TORCH_MOE_LORA_CPU_ONLY": "1"}
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    names = {Path(name).relative_to(Path(name).parts[0]).as_posix() for name in tarfile.open(archive).getnames()}
    expected = {f"csrc/{f.name}" for f in (ROOT / "csrc").iterdir()}
    assert expected <= names, sorted(expected - names)
