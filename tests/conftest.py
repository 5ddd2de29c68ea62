"""Hypothesis profiles, the Triton interpreter switch, and fixtures shared by the test modules.

Profiles (``HYPOTHESIS_PROFILE=<name>``, ``ci`` when unset): every run draws fresh examples.
  ci        200 examples a property test; tests that run Triton's interpreter on the CPU ask for fewer
            (``utils.interpreted_examples``). A failure prints the blob that replays it.
  thorough  for a GPU machine, where the kernels are compiled: 1000 examples a property test.
  quick     25 examples a property test, for a smoke run of every test file on a GPU machine (each
            new shape compiles kernels, so 200 examples of every property test take tens of minutes).
"""

import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.register_profile("quick", max_examples=25, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The switch is read when
# a kernel is decorated, so it is set before any test imports the package.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from utils import make_peft_adapters  # noqa: E402


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory):
    """``peft_adapters(family)``: that family's ``utils.make_peft_adapters`` (name -> (directory,
    PEFT model)), built once per session. Tests copy what they change and never write into them."""
    cache = {}

    def build(family: str):
        if family not in cache:
            cache[family] = make_peft_adapters(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return build
