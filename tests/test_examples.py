"""The examples run as a user runs them and report agreement (on the CPU: float32, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(*args: str) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, whatever the machine
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    return done.stdout


def test_quickstart_agrees_with_peft():
    assert "all rows agree with PEFT" in run_example("quickstart.py")


@pytest.mark.parametrize("parallelism", ["tensor", "expert"])
def test_parallel_example_matches_one_process(parallelism):
    out = run_example("parallel.py", "--parallelism", parallelism, "--world", "2")
    ranks = [line for line in out.splitlines() if line.startswith("rank ")]
    assert len(ranks) == 2 and all("the same greedy tokens" in line for line in ranks), out
    diffs = [float(line.split("= ")[1].split()[0]) for line in ranks]
    assert max(diffs) <= 1e-4, out
