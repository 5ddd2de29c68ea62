"""Loads the compiled extension ``torch_moe_lora._C``, refusing one built against another torch.

An extension compiled against one torch release fails to load with another, or loads and breaks
later. ``setup.py`` records the torch each build is compiled against in ``_build_info.py`` beside
``_C``; ``load_extension`` compares it with the installed torch before loading the library. Every
failure raises an ImportError that names the pip command rebuilding ``_C`` against the installed torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shlex
import sys
from urllib.parse import unquote, urlparse

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def installed_from() -> str | None:
    """The local directory pip installed this package from (its ``direct_url.json``), or None."""
    try:
        text = importlib.metadata.distribution("torch_moe_lora").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    url = urlparse(json.loads(text)["url"]) if text else None
    if url is None or url.scheme != "file" or not os.path.isdir(unquote(url.path)):
        return None
    return unquote(url.path)


def rebuild_command() -> str:
    """The pip command that rebuilds ``_C`` against the installed torch, for this copy of the package."""
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation"]
    checkout = os.path.dirname(PACKAGE_DIR)
    if os.path.isfile(os.path.join(checkout, "setup.py")):  # an editable install or an in-place build
        return shlex.join([*pip, "-e", checkout])
    source = installed_from()
    return shlex.join([*pip, source]) if source else f"{shlex.join(pip)} <the torch_moe_lora source directory>"


def load_extension() -> None:
    """Loads ``torch_moe_lora._C``, whose library registers the compiled ops.

    Raises:
        ImportError: ``_C`` was built against another torch than the installed one, or does not load.
    """
    try:
        from torch_moe_lora._build_info import TORCH_VERSION as built_against
    except ModuleNotFoundError:  # built by an older setup.py, which kept no record: nothing to compare
        built_against = None
    if built_against is not None and built_against != torch.__version__:
        raise ImportError(
            f"torch_moe_lora._C, the compiled extension, was built against torch {built_against}, but torch "
            f"{torch.__version__} is installed; an extension only works with the torch it was built against. "
            "`pip install` without --no-build-isolation builds against a torch of its own, not the installed "
            f"one. Rebuild it against the installed torch: {rebuild_command()}"
        )
    try:
        importlib.import_module("torch_moe_lora._C")
    except ImportError as error:
        raise ImportError(
            f"torch_moe_lora._C, the compiled extension, could not be loaded with torch {torch.__version__} "
            f"({error}). Build it against the installed torch: {rebuild_command()}"
        ) from error
