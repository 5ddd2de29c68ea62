"""Launch configs of the kernels: the schemas (``LaunchConfig``, ``LinearLoRAConfig``) and the tuned data.

``<device>.json`` (device name with non-alphanumerics replaced by ``_``) maps a shape key
``E=..,H=..,I=..,K=..`` (``,W=fp8`` appended for FP8 expert weights) to token-count buckets, each a ``LaunchConfig`` as a JSON object; the call
takes the smallest bucket >= its token count, else the largest. ``default.json`` maps buckets of
average rows per expert (``T * K / E``, which decides the tile shapes across models with few large
experts and many small ones alike) to configs for any device and shape without a tuned entry; its
values follow the H200 tuning of Qwen3-30B-A3B at the same rows per expert, and its two largest
buckets set ``tma``, as the H100 tuning did in its prefill buckets of 64 or more rows per expert.
The files hold configs only, each with the keys whose values differ from the defaults
(``LaunchConfig.to_dict``); they are parsed once, and unknown keys and wrong types raise, naming the
key and the file. ``benchmarks/tune.py`` writes the device files (and its timings to
``benchmarks/results/<device>/tuned_config_timings.json``).

``lora_linear.json`` maps token-count buckets to ``LinearLoRAConfig`` for the per-token LoRA of linear
layers (``ops/lora_linear.py``), for every device.
"""

import dataclasses
import functools
import json
import re
import types
from pathlib import Path

CONFIG_DIR = Path(__file__).parent


class _Checked:
    """Checks the field values of a config dataclass when it is made (``_check_values``)."""

    def __post_init__(self):
        _check_values(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmTiles(_Checked):
    """Tiles of one GEMM kernel (``gate_up`` or ``down``)."""

    block_n: int
    """Output columns per program."""
    block_k: int
    """Step of the K loop (and of the LoRA expand's rank loop)."""
    group_m: int
    """Blocks of rows that take one column tile after another, for L2 reuse of the weights."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software pipeline stages of the K loop (fewer where the tiles would not fit shared memory)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShrinkTiles(_Checked):
    """Tiles of the LoRA shrink kernel (``s = scale * inp @ A^T``), launched on x and on h."""

    block_k: int
    """Step of the loop over the input features."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software pipeline stages of that loop."""
    max_block_r: int = 128
    """Largest rank tile; a program takes ``min(max_block_r, launch.rank_block(rank))`` ranks."""
    slot_programs: int | None = None
    """Programs per sub-block, each taking every ``slot_programs``-th slot present in it; None: one
    program per slot a sub-block can hold."""
    k_per_program: int | None = None
    """Input features per program (a multiple of ``block_k``); None: all. With fewer than the input's,
    ``cdiv(in, k_per_program)`` programs each write float32 partial sums of their features, which the
    GEMM's LoRA steps add in split order (decode, where a program's loop over all of them is long
    and few programs run)."""

    def __post_init__(self):
        super().__post_init__()
        if self.k_per_program is not None and self.k_per_program % self.block_k != 0:
            raise ValueError(f"shrink.k_per_program {self.k_per_program} must be a multiple of shrink.block_k {self.block_k}")

    def splits(self, in_features: int) -> int:
        """Programs (partial sums) over ``in_features`` input features."""
        return _splits(in_features, self.k_per_program)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SumTiles(_Checked):
    """Tiles of the top-k sum kernel (``out[t] = sum_k y[t, k]``)."""

    block_n: int = 1024
    """Hidden columns per program."""
    num_warps: int = 4
    """Warps per program."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchConfig(_Checked):
    """How one fused experts call is launched: one bucket of a config file."""

    block_m: int
    """Rows (sorted pairs) per block, shared by every kernel of the call; each block is one expert's."""
    sub_m: int = 16
    """Rows of a shrink sub-block; divides ``block_m``."""
    pair_blocks: bool = False
    """No align op: every (token, k) pair is a block of its own (16 rows, one used) and its expert is
    read from ``topk_ids``. For decode, where an expert rarely gets two pairs; ``block_m`` and
    ``sub_m`` are then unused."""
    tma: bool = False
    """The GEMMs read their expert weight tiles through tensor descriptors (the copy engine; sm_90+,
    gate block then up block, rows 16-byte aligned) instead of computed pointers."""
    fp8_activations: bool = False
    """FP8 expert weights whose scale blocks hold whole K tiles of both GEMMs, tiles of at least 32
    along K (the checkpoints' blocks of 128 with K tiles of 32 to 128):
    x and the activations are quantized to FP8 per token and group of the blocks' ``block_k``
    (``reference.quantize_groups_ref``) and the GEMMs run on the FP8 tensor cores (prefill). Without
    it, or where the blocks do not allow it, the weight tiles are converted to x's dtype. No effect
    on weights in x's dtype."""
    pdl: bool = True
    """Programmatic dependent launch on sm_90+: each kernel launches while the previous one drains
    and waits for its writes only before reading them; with LoRA the GEMMs also run their base K
    loop before waiting for the shrink kernel."""
    gate_up: GemmTiles
    """Tiles of the gate_up GEMM (``h = act(w13 x + ...)``)."""
    down: GemmTiles
    """Tiles of the down GEMM (``y = w2 h + ...``)."""
    shrink: ShrinkTiles
    """Tiles of the LoRA shrink kernel."""
    sum: SumTiles = dataclasses.field(default_factory=SumTiles)
    """Tiles of the top-k sum kernel."""

    @classmethod
    def from_dict(cls, data: dict, where: str = "launch config") -> "LaunchConfig":
        """Parses a JSON object; raises ``ValueError``/``TypeError`` naming ``where`` and the key."""
        return _parse(cls, data, where, "")

    def to_dict(self) -> dict:
        """The JSON object of this config: every key whose value differs from its default."""
        return _to_dict(self)

    def __post_init__(self):
        super().__post_init__()
        if self.block_m % self.sub_m != 0:
            raise ValueError(f"block_m {self.block_m} must be a multiple of sub_m {self.sub_m}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearLoRATiles(_Checked):
    """Tiles of one ``add_lora_linear`` kernel (the shrink reads ``block_k`` input columns per step,
    the expand writes ``block_n`` output columns per program)."""

    block: int
    """``block_k`` of the shrink, ``block_n`` of the expand."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software pipeline stages."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearLoRAConfig(_Checked):
    """How one ``add_lora_linear`` call is launched: one bucket of ``lora_linear.json``."""

    block_m: int
    """Tokens per block; a block holds one slot's tokens."""
    shrink: LinearLoRATiles
    """Tiles of the shrink kernel (``u = scale * x A^T``)."""
    expand: LinearLoRATiles
    """Tiles of the expand kernel (``out += u B^T``)."""
    k_per_program: int | None = None
    """Input features one shrink program sums over, a multiple of ``shrink.block``: a block's
    ``cdiv(in, k_per_program)`` programs each write their partial sums and the expand adds them, in
    a fixed order (decode, where a block's loop over all the features is latency-bound). None: one
    program per block takes all of them."""

    @classmethod
    def from_dict(cls, data: dict, where: str = "launch config") -> "LinearLoRAConfig":
        """Parses a JSON object; raises ``ValueError``/``TypeError`` naming ``where`` and the key."""
        return _parse(cls, data, where, "")

    def __post_init__(self):
        super().__post_init__()
        if self.k_per_program is not None and self.k_per_program % self.shrink.block != 0:
            raise ValueError(f"k_per_program {self.k_per_program} must be a multiple of shrink.block {self.shrink.block}")

    def shrink_splits(self, in_features: int) -> int:
        """Shrink programs per block for ``in_features`` input features."""
        return _splits(in_features, self.k_per_program)


def _splits(in_features: int, k_per_program: int | None) -> int:
    """Programs over ``in_features`` input features, ``k_per_program`` each (None: one for all)."""
    return 1 if k_per_program is None else max(1, -(-in_features // k_per_program))


_POWERS_OF_TWO = {"block_m", "sub_m", "block_n", "block_k", "block", "max_block_r", "num_warps"}
"""Fields that size a ``tl.arange`` or a warp count: powers of two."""


def _check_values(obj) -> None:
    """Raises where a field has the wrong type, or an integer is < 1 or not a power of two where it must be."""
    for field in dataclasses.fields(obj):
        value, key = getattr(obj, field.name), field.name
        kind = field.type
        allowed = kind.__args__ if isinstance(kind, types.UnionType) else (kind,)
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, kind):
                raise TypeError(f"{key} must be a {kind.__name__}, got {type(value).__name__}")
            continue
        if not any(type(value) is t or (t is type(None) and value is None) for t in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise TypeError(f"{key} must be {names}, got {value!r}")
        if type(value) is int:
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
            if field.name in _POWERS_OF_TWO and value & (value - 1):
                raise ValueError(f"{key} must be a power of two, got {value}")


def _parse(cls, data, where: str, prefix: str):
    known = [field.name for field in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise TypeError(f"{where}: {prefix.rstrip('.') or 'a config'} must be an object with keys {known}")
    for key in data:
        if key not in known:
            raise ValueError(f"{where}: unknown key {prefix + key!r} (known: {', '.join(known)})")
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing key {prefix + field.name!r}")
            continue
        value = data[field.name]
        if dataclasses.is_dataclass(field.type):
            value = _parse(field.type, value, where, f"{prefix}{field.name}.")
        values[field.name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {prefix}{error}") from None


def _to_dict(obj) -> dict:
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        if field.default_factory is not dataclasses.MISSING and value == field.default_factory():
            continue
        out[field.name] = _to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def device_file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


WEIGHT_FORMATS = ("fp8",)
"""Expert weight formats with entries of their own (``shape_key``'s ``weights``): FP8 (e4m3) tiles
are half the bytes of 16-bit ones, so they take other tiles (and ``fp8_activations``)."""


def shape_key(num_experts: int, hidden: int, inter: int, top_k: int, weights: str | None = None) -> str:
    """``E=..,H=..,I=..,K=..``, with ``,W=<weights>`` for expert weights in one of ``WEIGHT_FORMATS``
    (None: weights in x's dtype)."""
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be None or one of {WEIGHT_FORMATS}, got {weights!r}")
    key = f"E={num_experts},H={hidden},I={inter},K={top_k}"
    return key if weights is None else f"{key},W={weights}"


def parse_buckets(data: dict, where: str, schema=LaunchConfig) -> dict:
    """``{bucket: config object}`` parsed into ``{int bucket: schema}``, sorted by bucket."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected an object of token buckets, got {data!r}")
    buckets = {}
    for bucket, config in data.items():
        if not bucket.isdigit():
            raise ValueError(f"{where}: bucket {bucket!r} is not a non-negative integer")
        buckets[int(bucket)] = schema.from_dict(config, f"{where}, bucket {bucket}")
    return dict(sorted(buckets.items()))


@functools.cache
def _device_configs(file_name: str) -> dict[str, dict[int, LaunchConfig]]:
    path = CONFIG_DIR / file_name
    if not path.exists():
        return {}
    shapes = json.loads(path.read_text())
    return {shape: parse_buckets(buckets, f"{file_name}, {shape}") for shape, buckets in shapes.items()}


@functools.cache
def _default_configs() -> dict[int, LaunchConfig]:
    return parse_buckets(json.loads((CONFIG_DIR / "default.json").read_text()), "default.json")


@functools.cache
def _linear_lora_configs() -> dict[int, LinearLoRAConfig]:
    return parse_buckets(
        json.loads((CONFIG_DIR / "lora_linear.json").read_text()), "lora_linear.json", LinearLoRAConfig
    )


def get_linear_lora_config(num_tokens: int) -> LinearLoRAConfig:
    """The ``add_lora_linear`` launch config for ``num_tokens`` tokens (``lora_linear.json``, by token count)."""
    return _pick_bucket(_linear_lora_configs(), num_tokens)


def _pick_bucket(buckets: dict, size: int):
    return next((config for bucket, config in buckets.items() if bucket >= size), buckets[max(buckets)])


def get_config(
    device_name: str | None, num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int,
    weights: str | None = None,
) -> LaunchConfig:
    """The launch config for one call: the tuned entry for this device, shape and weight format
    (``shape_key``) if any, else (FP8 weights without an entry of their own) the shape's entry for
    16-bit weights, else the default."""
    if device_name is not None:
        entries = _device_configs(device_file_name(device_name))
        shape = (num_experts, hidden, inter, top_k)
        keys = dict.fromkeys((shape_key(*shape, weights), shape_key(*shape)))
        tuned = next((entries[key] for key in keys if key in entries), None)
        if tuned:
            return _pick_bucket(tuned, num_tokens)
    rows_per_expert = -(-num_tokens * top_k // num_experts)
    return _pick_bucket(_default_configs(), rows_per_expert)
