"""The launch config schema (``torch_moe_lora.configs.LaunchConfig``) and the tuned files."""

from __future__ import annotations

import json

import pytest
import torch

import torch_moe_lora.configs as configs_module
import torch_moe_lora.ops.fused_experts as fused_experts_module
from torch_moe_lora.configs import (
    CONFIG_DIR, LaunchConfig, LinearLoRAConfig, ShrinkTiles, get_config, get_linear_lora_config, parse_buckets, shape_key,
)  # fmt: skip
from torch_moe_lora.ops.fused_experts import launch_config

FUSED_EXPERTS_FILES = ["default.json", "NVIDIA_H100_80GB_HBM3.json", "NVIDIA_H200.json"]
TILES = dict(block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=3)
VALID = dict(block_m=32, gate_up=TILES, down=TILES, shrink=dict(block_k=128, num_warps=4, num_stages=3))


@pytest.mark.parametrize("name", FUSED_EXPERTS_FILES)
def test_shipped_files_parse_and_hold_only_non_default_keys(name):
    data = json.loads((CONFIG_DIR / name).read_text())
    shapes = {name: data} if name == "default.json" else {f"{name}, {shape}": b for shape, b in data.items()}
    for where, buckets in shapes.items():
        for bucket, config in parse_buckets(buckets, where).items():
            assert config.to_dict() == buckets[str(bucket)], f"{where}, bucket {bucket}: keys at their defaults"


def test_defaults_and_round_trip():
    config = LaunchConfig.from_dict(VALID)
    switches = (config.sub_m, config.pair_blocks, config.tma, config.pdl)
    assert switches == (16, False, False, True)
    assert (config.shrink.max_block_r, config.shrink.slot_programs, config.sum.block_n) == (128, None, 1024)
    assert config.to_dict() == VALID
    assert LaunchConfig.from_dict(config.to_dict()) == config


BAD_CONFIGS = [
    ({"block_size": 16}, ValueError, r"f\.json: unknown key 'block_size'"),
    ({"shrink": {**VALID["shrink"], "fuse": 1}}, ValueError, r"unknown key 'shrink\.fuse'"),
    ({"block_m": True}, TypeError, r"f\.json: block_m must be int, got True"),
    ({"tma": 1}, TypeError, "tma must be bool, got 1"),
    ({"gate_up": {**TILES, "block_n": "64"}}, TypeError, r"gate_up\.block_n must be int"),
    ({"gate_up": [64]}, TypeError, "gate_up must be an object"),
    ({"shrink": {**VALID["shrink"], "slot_programs": 0}}, ValueError, r"shrink\.slot_programs must be >= 1, got 0"),
    ({"down": {**TILES, "block_k": 48}}, ValueError, r"down\.block_k must be a power of two, got 48"),
    ({"sub_m": 64}, ValueError, "block_m 32 must be a multiple of sub_m 64"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_CONFIGS)
def test_bad_configs_raise_naming_the_file_and_key(change, error, message):
    with pytest.raises(error, match=message):
        LaunchConfig.from_dict({**VALID, **change}, "f.json")


def test_missing_key_raises():
    with pytest.raises(ValueError, match="f.json: missing key 'down'"):
        LaunchConfig.from_dict({k: v for k, v in VALID.items() if k != "down"}, "f.json")


def test_get_config_picks_the_bucket():
    assert get_config("NVIDIA H200", 128, 2048, 768, 8, 1).pair_blocks
    assert get_config("NVIDIA H200", 128, 2048, 768, 8, 100000).block_m == 128, "past the last bucket: the largest"
    assert get_config("a device without a file", 8, 64, 32, 2, 1) == get_config(None, 8, 64, 32, 2, 1)
    assert isinstance(get_config(None, 8, 64, 32, 2, 1), LaunchConfig)


def bucket_edges(buckets: dict) -> list[tuple[int, int]]:
    """(size, the bucket it falls in): each bucket's largest size and the size one above it (the next
    bucket's smallest; past the last bucket, the last bucket)."""
    edges = []
    for bucket, following in zip(buckets, [*list(buckets)[1:], max(buckets)]):
        edges += [(bucket, bucket), (bucket + 1, following)]
    return edges


def differing_neighbours(buckets: dict) -> int:
    """How many neighbouring buckets hold different configs."""
    configs = list(buckets.values())
    return sum(a != b for a, b in zip(configs, configs[1:]))


WEIGHT_DTYPES = {None: torch.float32, "fp8": torch.float8_e4m3fn}
"""The expert weights' dtype of each shape key's weight format (``shape_key``)."""


def call_shapes(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, weights: str | None = None):
    """``x``, ``topk_ids`` and ``w2`` of a call, as meta tensors (``launch_config`` reads their shapes
    and the weights' dtype)."""
    meta = dict(device="meta")
    return (
        torch.empty(num_tokens, hidden, **meta),
        torch.empty(num_tokens, top_k, dtype=torch.int64, **meta),
        torch.empty(num_experts, hidden, inter, dtype=WEIGHT_DTYPES[weights], **meta),
    )


@pytest.mark.parametrize("name", [n for n in FUSED_EXPERTS_FILES if n != "default.json"])
def test_launch_config_takes_the_tuned_bucket_of_the_token_count(name, monkeypatch):
    """On each tuned device and shape, a call gets the file's config for the bucket of its token
    count, at both sides of every bucket edge; somewhere the two sides differ, so a pick that ignores
    the token count (or reads another size as it) fails."""
    device_name = name.removesuffix(".json").replace("_", " ")
    monkeypatch.setattr(fused_experts_module, "_device_name", lambda device: device_name)
    differing_edges = 0
    for shape, entries in json.loads((CONFIG_DIR / name).read_text()).items():
        sizes = dict(item.split("=") for item in shape.split(","))
        E, H, I, K = (int(sizes[key]) for key in "EHIK")
        buckets = parse_buckets(entries, f"{name}, {shape}")
        for tokens, bucket in bucket_edges(buckets):
            call = call_shapes(tokens, E, H, I, K, sizes.get("W"))
            assert launch_config(*call) == buckets[bucket], (shape, tokens, bucket)
        differing_edges += differing_neighbours(buckets)
    assert differing_edges, f"{name}: every bucket of every shape holds the same config"


def test_fp8_weights_take_their_own_entry_else_the_shape_s(monkeypatch, tmp_path):
    """A shape's ``W=fp8`` entry serves calls with FP8 experts only; without one, FP8 experts take the
    shape's entry for 16-bit weights; an unknown weight format is refused."""
    bf16, fp8 = dict(VALID, block_m=32), dict(VALID, block_m=64, fp8_activations=True)
    shape = shape_key(8, 64, 32, 2)
    (tmp_path / "GPU_A.json").write_text(json.dumps({shape: {"1": bf16}, shape_key(8, 64, 32, 2, "fp8"): {"1": fp8}}))
    (tmp_path / "GPU_B.json").write_text(json.dumps({shape: {"1": bf16}}))
    monkeypatch.setattr(configs_module, "CONFIG_DIR", tmp_path)
    configs_module._device_configs.cache_clear()
    try:
        for device, weights, expected in (("GPU A", None, bf16), ("GPU A", "fp8", fp8), ("GPU B", "fp8", bf16)):
            monkeypatch.setattr(fused_experts_module, "_device_name", lambda _, device=device: device)
            got = launch_config(*call_shapes(1, 8, 64, 32, 2, weights))
            assert got == LaunchConfig.from_dict(expected, "test"), (device, weights)
    finally:
        configs_module._device_configs.cache_clear()
    with pytest.raises(ValueError, match="weights must be None or one of"):
        shape_key(8, 64, 32, 2, "int4")


def test_launch_config_takes_the_default_bucket_of_the_rows_per_expert():
    """A device or shape without a tuned entry (here the CPU): the default bucket of the rows each
    expert gets, T * K / E rounded up (E=8, K=2: T / 4), at both sides of every bucket edge."""
    buckets = parse_buckets(json.loads((CONFIG_DIR / "default.json").read_text()), "default.json")
    assert differing_neighbours(buckets), "default.json holds one config in every bucket"
    for rows, bucket in bucket_edges(buckets):
        for tokens in (4 * rows - 3, 4 * rows):
            assert launch_config(*call_shapes(tokens, 8, 64, 32, 2)) == buckets[bucket], (rows, tokens, bucket)


def test_linear_lora_configs_parse_and_pick_by_token_count():
    buckets = parse_buckets(json.loads((CONFIG_DIR / "lora_linear.json").read_text()), "lora_linear.json", LinearLoRAConfig)
    assert get_linear_lora_config(1) == buckets[min(buckets)]
    assert get_linear_lora_config(10**9) == buckets[max(buckets)]
    with pytest.raises(ValueError, match=r"x.json, bucket 8: unknown key 'expand.block_n'"):
        bad = {"block_m": 16, "shrink": {"block": 64, "num_warps": 4, "num_stages": 2}, "expand": {"block_n": 64}}
        parse_buckets({"8": bad}, "x.json", LinearLoRAConfig)
    split = {"block_m": 16, "shrink": {"block": 64, "num_warps": 4, "num_stages": 2},
             "expand": {"block": 64, "num_warps": 4, "num_stages": 1}}  # fmt: skip
    with pytest.raises(ValueError, match=r"x.json, bucket 8: k_per_program 96 must be a multiple of shrink.block 64"):
        parse_buckets({"8": {**split, "k_per_program": 96}}, "x.json", LinearLoRAConfig)
    config = parse_buckets({"8": {**split, "k_per_program": 128}}, "x.json", LinearLoRAConfig)[8]
    assert [config.shrink_splits(n) for n in (1, 128, 129, 2048)] == [1, 1, 2, 16]


def test_shrink_splits_over_the_input_features():
    """``shrink.k_per_program``: a multiple of ``block_k``; the splits cover the input features."""
    tiles = ShrinkTiles(block_k=64, num_warps=4, num_stages=3, k_per_program=256)
    assert [tiles.splits(k) for k in (1, 256, 257, 768, 2048)] == [1, 1, 2, 3, 8]
    assert ShrinkTiles(block_k=64, num_warps=4, num_stages=3).splits(2048) == 1
    with pytest.raises(ValueError, match=r"shrink\.k_per_program 96 must be a multiple of shrink\.block_k 64"):
        ShrinkTiles(block_k=64, num_warps=4, num_stages=3, k_per_program=96)
