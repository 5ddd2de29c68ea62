"""Tuned launch configs as data.

``<device>.json`` (device name with non-alphanumerics replaced by ``_``) maps a shape key
``E=..,H=..,I=..,K=..`` to token-count buckets, each a config; ``default.json`` holds configs
for any device and shape without a tuned entry, by average rows per expert (``T * K / E``), which
decides the tile shapes across models with few large experts and many small ones alike.
``benchmarks/tune.py`` writes device files.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def device_file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def shape_key(num_experts: int, hidden: int, inter: int, top_k: int) -> str:
    return f"E={num_experts},H={hidden},I={inter},K={top_k}"


@functools.cache
def _load(file_name: str) -> dict:
    path = CONFIG_DIR / file_name
    return json.loads(path.read_text()) if path.exists() else {}


def _pick_bucket(buckets: dict, num_tokens: int) -> dict:
    sizes = sorted(int(b) for b in buckets)
    chosen = next((b for b in sizes if b >= num_tokens), sizes[-1])
    return buckets[str(chosen)]


def get_config(device_name: str | None, num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int) -> dict:
    """The launch config for one call: the tuned entry for this device and shape if any, else the default."""
    if device_name is not None:
        tuned = _load(device_file_name(device_name)).get(shape_key(num_experts, hidden, inter, top_k))
        if tuned:
            return _pick_bucket(tuned, num_tokens)
    rows_per_expert = -(-num_tokens * top_k // num_experts)
    return _pick_bucket(_load("default.json")["buckets"], rows_per_expert)
