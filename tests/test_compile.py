"""The Triton kernels compile for an sm_90 GPU under the tuned H200 configs and fit its shared memory.

The interpreter the other CPU tests use never runs Triton's compiler, so this runs
``tests/compile_cases.py`` (which compiles without launching) in a process without
``TRITON_INTERPRET``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "compile_cases.py"


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's compiler ships for Linux only")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(CASES)], env=env, capture_output=True, text=True, timeout=900)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    assert "FAILED" not in report, report[-6000:]
    assert "kernels compiled for sm_90" in report, report[-6000:]
