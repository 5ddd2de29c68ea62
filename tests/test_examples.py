"""The examples run as a user runs them and report agreement (on the CPU: float32, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(*args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    """Runs ``examples/<args[0]> args[1:]``; asserts its exit status and returns what it printed."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, whatever the machine
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=600
    )
    print(done.stdout, done.stderr)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done


def test_quickstart_agrees_with_peft():
    done = run_example("quickstart.py")
    assert "all rows agree with PEFT" in done.stdout
    # PEFT 0.21 warns that the demo's rank_pattern {"experts.down_proj": 6} matched nothing; it is applied.
    assert "rank_pattern" not in done.stderr


def test_quickstart_adapter_needs_a_name():
    done = run_example("quickstart.py", "--adapter", "/path/to/adapter", returncode=2)
    assert "argument --adapter: expected NAME=PATH (e.g. math=/path/to/adapter), got '/path/to/adapter'" in done.stderr


@pytest.mark.parametrize("parallelism", ["tensor", "expert"])
def test_parallel_example_matches_one_process(parallelism):
    done = run_example("parallel.py", "--parallelism", parallelism, "--world", "2")
    assert "rank_pattern" not in done.stderr
    out = done.stdout
    ranks = [line for line in out.splitlines() if line.startswith("rank ")]
    assert len(ranks) == 2 and all("the same greedy tokens" in line for line in ranks), out
    diffs = [float(line.split("= ")[1].split()[0]) for line in ranks]
    assert max(diffs) <= 1e-4, out


def test_serve_example_gives_every_request_its_adapter():
    """Continuous batching with more adapters than slots: every request agrees with PEFT alone, and the
    request naming an unknown adapter is refused without stopping the others."""
    done = run_example("serve.py")
    assert "request 5 refused alone" in done.stdout
    assert "15 of 15 checked requests agree with PEFT token for token" in done.stdout, done.stdout
