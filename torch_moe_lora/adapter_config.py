"""An adapter as saved, before its weights meet the model's layouts: its config, state dict and files.

``AdapterConfig`` holds one adapter's ``LoraConfig`` fields, read for one model: it checks them (the
PEFT type, each field's type and value, named with its value and what PEFT expects; features that
change what an adapter computes beyond B A x are refused), gives the scales, and says which modules
and parameters the config targets.

Scales follow PEFT: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with ``rank_pattern`` and
``alpha_pattern`` matched against the module key (``<module>.<parameter>`` for target parameters).

Which weights count follows ``PeftModel.from_pretrained``: PEFT gives LoRA layers only to modules the
config targets (``target_modules`` as a list, a regex or ``all-linear``, less ``exclude_modules``,
within ``layers_to_transform``; matched by PEFT's own ``check_target_module_exists``) and to the
parameters ``target_parameters`` names, then loads the file with ``strict=False``: weights of any
other module are dropped without a word (``adapters.read_adapter`` drops them too, with a warning
naming them). The config is matched as written against this model's module names: PEFT 0.21's
renaming of transformers-4 expert names for the families it converts (Mixtral, the Qwen2-MoE group),
which also turns a string ``target_modules`` into bare leaf names, is not reproduced.

``lora_layers`` groups a state dict's keys (``base_model.model.<module>.lora_A.weight``, as PEFT saves
them) by module, refusing keys that are not LoRA weights and tensors that are not floating-point 2-D
matrices; keys of features a layer may carry beyond A and B are noted on the layer, to be refused if
the module is targeted.

``load_adapter_files`` and ``open_adapter_files`` read a directory saved by PEFT's ``save_pretrained``
(``adapter_config.json`` and ``adapter_model.safetensors``; pickle files are never read).

Every error names the adapter (and its directory or file).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def adapter_where(name: str | None, path=None) -> str:
    """How errors name an adapter: ``adapter 'name' (path)``; only the path without a name, only
    ``adapter 'name'`` without a path (one given in memory).

    Args:
        name: the adapter's name, or None. path: its directory or a file in it, or None.

    Returns:
        The ``str`` that starts its error messages.
    """
    if path is None:
        return f"adapter {name!r}"
    return str(path) if name is None else f"adapter {name!r} ({path})"


def _error(where: str, message: str, kind: type[Exception] = ValueError) -> Exception:
    return kind(f"{where}: {message}")


def _unsupported(where: str, feature: str) -> Exception:
    return _error(where, f"{feature} is not supported", NotImplementedError)


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_names(value) -> bool:
    """None, or a list (tuple, set) of strings."""
    return value is None or (isinstance(value, (list, tuple, set)) and all(isinstance(name, str) for name in value))


def _is_names_or_str(value) -> bool:
    return isinstance(value, str) or _is_names(value)


def _is_layers(value) -> bool:
    return value is None or _is_int(value) or (isinstance(value, list) and all(map(_is_int, value)))


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _is_regex_if_str(value) -> bool:
    return not isinstance(value, str) or _is_regex(value)


def _is_pattern(value, is_entry: Callable[[object], bool]) -> bool:
    """None, or a mapping of ``str`` to values ``is_entry`` accepts."""
    if value is None:
        return True
    return isinstance(value, Mapping) and all(isinstance(key, str) and is_entry(v) for key, v in value.items())


def _is_rank_pattern(value) -> bool:
    return _is_pattern(value, _is_int)


def _is_alpha_pattern(value) -> bool:
    return _is_pattern(value, _is_number)


def _valid_ranks(pattern: Mapping | None) -> bool:
    return all(_is_regex(key) and rank > 0 for key, rank in (pattern or {}).items())


def _valid_alphas(pattern: Mapping | None) -> bool:
    return all(_is_regex(key) and math.isfinite(alpha) for key, alpha in (pattern or {}).items())


class _Field(NamedTuple):
    """A LoraConfig field the reader uses: PEFT's default, what PEFT expects, whether a value has the
    right type (else TypeError), and whether a value of that type is valid (else ValueError)."""

    default: object
    expected: str
    has_type: Callable[[object], bool]
    is_valid: Callable[[object], bool] | None = None


_FIELDS = {
    "r": _Field(8, "a positive int (the rank)", _is_int, lambda r: r > 0),
    "lora_alpha": _Field(8, "a finite number (alpha; the scale is alpha / r)", _is_number, math.isfinite),
    "use_rslora": _Field(False, "a bool", _is_bool),
    "rank_pattern": _Field({}, "null or an object of regex -> positive int rank", _is_rank_pattern, _valid_ranks),
    "alpha_pattern": _Field({}, "null or an object of regex -> finite alpha", _is_alpha_pattern, _valid_alphas),
    "target_modules": _Field(
        None, "null, a list of module names, a regex or 'all-linear'", _is_names_or_str, _is_regex_if_str
    ),
    "exclude_modules": _Field(None, "null, a list of module names or a regex", _is_names_or_str, _is_regex_if_str),
    "target_parameters": _Field(None, "null or a list of parameter names", _is_names),
    "layers_to_transform": _Field(None, "null, a layer index or a list of layer indices", _is_layers),
    "layers_pattern": _Field(None, "null, a name or a list of names", _is_names_or_str),
    "bias": _Field("none", "'none', 'all' or 'lora_only'", lambda bias: isinstance(bias, str)),
    "use_dora": _Field(False, "a bool", _is_bool),
    "lora_bias": _Field(False, "a bool", _is_bool),
    "fan_in_fan_out": _Field(False, "a bool", _is_bool),
}
# Config fields that change what an adapter computes beyond B A x; any truthy value is refused.
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "megatron_config": "Megatron layers (megatron_config)",
}
# The fields PEFT decides the targeted modules and parameters by.
_TARGETING = ("target_modules", "exclude_modules", "target_parameters", "layers_to_transform", "layers_pattern")


def _pattern_value(patterns: Mapping[str, object] | None, key: str, default):
    # peft.utils.other.get_pattern_key: the first pattern that matches a dotted suffix of the key.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


class AdapterConfig:
    """One adapter's ``LoraConfig`` fields, read for one model: checks, scales and targets as PEFT has them.

    Call ``check`` first: it checks the fields and prepares the targets that ``targets_module`` reads.

    Args:
        config: the config as a dict (``LoraConfig.to_dict()`` or ``adapter_config.json``).
        where: how errors name the adapter (``adapter_where``).
        model: the base model the adapter is read for; its module names are what the config targets.
    """

    def __init__(self, config: dict, where: str, model: nn.Module):
        self.fields, self.where, self.model = config, where, model
        self.targets = None

    def error(self, message: str, kind: type[Exception] = ValueError) -> Exception:
        return _error(self.where, message, kind)

    def unsupported(self, feature: str) -> Exception:
        return _unsupported(self.where, feature)

    def check(self) -> None:
        """Checks the PEFT type, the types and values of the fields read (``_FIELDS``), refuses
        unsupported features, and prepares the targets (``peft_targets``).

        Raises:
            TypeError: a field of the wrong type. ValueError: a field's invalid value, or a config
                PEFT refuses or gives no targets. NotImplementedError: another PEFT type, or a
                feature beyond B A x (``_UNSUPPORTED_CONFIG``, a ``bias`` other than ``'none'``).
        """
        peft_type = self.fields.get("peft_type")
        if peft_type is None:
            raise self.error("the config has no peft_type (expected 'LORA')")
        if not isinstance(peft_type, str):
            raise self.error(f"config field peft_type={peft_type!r}: expected a string ('LORA')", TypeError)
        peft_type = str(getattr(peft_type, "value", peft_type))
        if peft_type != "LORA":
            raise self.unsupported(f"PEFT type {peft_type!r} (only LORA)")
        for field, spec in _FIELDS.items():
            value = self.fields.get(field, spec.default)
            if not spec.has_type(value):
                raise self.error(f"config field {field}={value!r}: expected {spec.expected}", TypeError)
            if spec.is_valid is not None and not spec.is_valid(value):
                raise self.error(f"config field {field}={value!r}: expected {spec.expected}")
        for field, feature in _UNSUPPORTED_CONFIG.items():
            if self.fields.get(field):
                raise self.unsupported(feature)
        if self.fields.get("bias", "none") != "none":
            raise self.unsupported(f"training base-model biases (bias={self.fields['bias']!r})")
        self.targets = self.peft_targets()

    def peft_targets(self):
        """PEFT's ``LoraConfig`` of the config's targeting fields (``_TARGETING``), prepared as PEFT
        prepares it for this model (``LoraModel._prepare_adapter_config``: no ``target_modules`` is
        the model type's default; ``_maybe_include_all_linear_layers``: ``all-linear`` is every
        linear layer but the output layer)."""
        # Imported here: peft takes about a second to import and only reading an adapter needs it.
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

        fields = {field: self.fields.get(field) for field in _TARGETING}
        if fields["target_modules"] is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            fields["target_modules"] = DEFAULT_TARGETS.get(model_type)
            if fields["target_modules"] is None and not fields["target_parameters"]:
                raise self.error(
                    "the config sets neither target_modules nor target_parameters, and PEFT has no default "
                    f"target_modules for model type {model_type!r}"
                )
        try:
            config = LoraConfig(**fields)
        except (TypeError, ValueError) as e:
            kind = TypeError if isinstance(e, TypeError) else ValueError
            raise self.error(f"PEFT refuses the config: {e}", kind) from e
        return _maybe_include_all_linear_layers(config, self.model)

    def describe_targets(self) -> str:
        """The targeting fields as written, for messages: ``target_modules=..., target_parameters=...``."""
        return (
            f"target_modules={self.fields.get('target_modules')!r}, "
            f"target_parameters={self.fields.get('target_parameters')!r}"
        )

    def targets_module(self, path: str) -> bool:
        """Whether ``target_modules`` selects the module ``path`` (PEFT's ``check_target_module_exists``:
        names or a regex, less ``exclude_modules``, within ``layers_to_transform``/``layers_pattern``)."""
        from peft.tuners.tuners_utils import check_target_module_exists

        return bool(check_target_module_exists(self.targets, path))

    def targets_parameter(self, name: str) -> bool:
        """Whether ``target_parameters`` names the parameter ``name`` (``<module path>.<parameter>``):
        it equals a target or ends in ``.<target>``."""
        return any(name == t or name.endswith(f".{t}") for t in self.fields.get("target_parameters") or ())

    def targeted_parameters(self, path: str, module: nn.Module) -> list[str]:
        """The module's own parameters that ``target_parameters`` names, in the module's order (PEFT's
        ``BaseTuner._inject_parameters``).

        Args:
            path: the module's name in the model. module: the module.

        Returns:
            The names of its targeted parameters (without ``path``).
        """
        return [name for name, _ in module.named_parameters(recurse=False) if self.targets_parameter(f"{path}.{name}")]

    def scale(self, key: str, rank: int) -> float:
        """PEFT's scaling for the module (or parameter) key; checks the configured rank.

        Args:
            key: the module path, or ``<module path>.<parameter>`` for a target parameter.
            rank: the rank of its weights.

        Returns:
            ``alpha / rank`` (``/ sqrt(rank)`` with ``use_rslora``), alpha from ``alpha_pattern``.

        Raises:
            ValueError: ``rank`` is not the rank the config gives the key (``r``, ``rank_pattern``).
        """
        configured = _pattern_value(self.fields.get("rank_pattern"), key, self.fields.get("r", 8))
        if configured != rank:
            raise self.error(f"{key}: the weights have rank {rank} but the config gives r={configured}")
        alpha = _pattern_value(self.fields.get("alpha_pattern"), key, self.fields.get("lora_alpha", 8))
        return alpha / (math.sqrt(rank) if self.fields.get("use_rslora") else rank)


# Keys of a module's LoRA layer that are not plain A/B weights, by the feature they belong to: refused
# on a targeted module, dropped with its other weights on a module the config does not target.
_UNSUPPORTED_LAYER_KEYS = (
    (".lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".lora_embedding_", "LoRA on embeddings"),
    (".lora_B.bias", "LoRA bias (lora_bias)"),
)
# Keys of features outside LoRA layers: always refused.
_UNSUPPORTED_KEYS = (
    (".modules_to_save.", "modules_to_save"),
    (".token_adapter.", "trainable tokens"),
)
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight")


class StoredTensor:
    """A 2-D tensor of an open safetensors file; indexing reads only the indexed slice.

    Attributes:
        key: its name in the file; shape: its ``torch.Size``; stored_dtype: the file's dtype name
        (``"F32"``, ``"BF16"``, ``"I64"``, ...).
    """

    def __init__(self, file, key: str):
        self.key, self._slice = key, file.get_slice(key)
        self.shape = torch.Size(self._slice.get_shape())
        self.stored_dtype = self._slice.get_dtype()

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.stored_dtype.startswith(("F", "BF"))

    def __getitem__(self, index) -> torch.Tensor:
        return self._slice[index]


class LoRALayer:
    """The state-dict entries of one module's LoRA layer: its keys, its ``"A"``/``"B"`` tensors, and
    the unsupported features its other keys belong to."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.factors: dict[str, torch.Tensor | StoredTensor] = {}
        self.unsupported: list[str] = []


def _check_tensor(where: str, key: str, tensor) -> None:
    if not isinstance(tensor, (torch.Tensor, StoredTensor)):
        raise _error(where, f"{key}: expected a torch.Tensor, got {type(tensor).__name__}", TypeError)
    if not tensor.is_floating_point():
        dtype = tensor.stored_dtype if isinstance(tensor, StoredTensor) else tensor.dtype
        raise _error(where, f"{key}: expected a floating-point tensor, got {dtype}", TypeError)
    if tensor.dim() != 2:
        raise _error(where, f"{key}: expected a 2-D matrix, got shape {tuple(tensor.shape)}")


def lora_layers(state_dict: Mapping[str, torch.Tensor | StoredTensor], where: str) -> dict[str, LoRALayer]:
    """The LoRA layers of a state dict by module path (PEFT's prefix removed).

    Args:
        state_dict: keyed as PEFT saves it (``base_model.model.<module>.lora_A.weight``); values
            2-D floating-point ``torch.Tensor`` or ``StoredTensor``.
        where: how errors name the adapter (``adapter_where``).

    Returns:
        Module path -> its ``LoRALayer`` (its A/B tensors as given, not copied).

    Raises:
        TypeError: a key that is not a ``str``, a value that is not a floating-point tensor.
        ValueError: a key that is not a LoRA weight, a tensor that is not 2-D, no LoRA weights.
        NotImplementedError: keys of features outside LoRA layers (``modules_to_save``, trainable tokens).
    """
    layers: dict[str, LoRALayer] = {}
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            raise _error(where, f"state dict key {key!r}: expected a str", TypeError)
        for marker, feature in _UNSUPPORTED_KEYS:
            if marker in key:
                raise _unsupported(where, f"{feature} (key {key})")
        marked = next(((m, f) for m, f in _UNSUPPORTED_LAYER_KEYS if m in key), None)
        if marked is not None:
            marker, feature = marked
            layer = layers.setdefault(key[: key.index(marker)].removeprefix(PEFT_PREFIX), LoRALayer())
            layer.unsupported.append(f"{feature} (key {key})")
        elif (match := _LORA_KEY.fullmatch(key)) is not None:
            _check_tensor(where, key, tensor)
            layer = layers.setdefault(match["module"].removeprefix(PEFT_PREFIX), LoRALayer())
            layer.factors[match["factor"]] = tensor
        else:
            raise _error(where, f"key {key} is not a LoRA A/B weight")
        layer.keys.append(key)
    if not layers:
        raise _error(where, "the state dict holds no LoRA weights")
    return layers


def _adapter_paths(path: str | os.PathLike, name: str | None) -> tuple[str, str]:
    if not os.path.isdir(path):
        problem = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{adapter_where(name, path)}: the path {problem}; expected a PEFT adapter directory")
    config_path, weights_path = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{adapter_where(name, path)}: no {ADAPTER_CONFIG}; expected a PEFT adapter directory")
    if not os.path.isfile(weights_path):
        pickled = " (adapter_model.bin is a pickle and is not read: re-save with safetensors)"
        raise FileNotFoundError(
            f"{adapter_where(name, path)}: no {ADAPTER_WEIGHTS}"
            f"{pickled if os.path.isfile(os.path.join(path, 'adapter_model.bin')) else ''}"
        )
    return config_path, weights_path


def _read_config(path: str, name: str | None) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{adapter_where(name, path)}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{adapter_where(name, path)}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise OSError(f"{adapter_where(name, path)}: cannot be read ({e})") from e
    if not isinstance(config, dict):
        got = type(config).__name__
        raise TypeError(f"{adapter_where(name, path)}: holds a JSON {got}, expected an object (LoraConfig fields)")
    return config


def _open_weights(path: str, name: str | None, opener: Callable[[str], object]):
    try:
        return opener(path)
    except SafetensorError as e:
        message = "not a readable safetensors file, truncated or corrupt"
        raise ValueError(f"{adapter_where(name, path)}: {message} ({e})") from e
    except OSError as e:
        raise OSError(f"{adapter_where(name, path)}: cannot be read ({e})") from e


def load_adapter_files(path: str | os.PathLike, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads ``adapter_config.json`` and ``adapter_model.safetensors`` from a PEFT adapter directory.

    Args:
        path: the directory. name: the adapter's name, for error messages (which always give the path).

    Returns:
        ``(state_dict, config)``: tensors on the CPU in the file's dtype, the config as a dict.

    Raises:
        FileNotFoundError: no such directory, or a file is missing (a pickled ``adapter_model.bin`` is
            named, not read). ValueError: a file is not valid JSON or safetensors (truncated, corrupt).
        TypeError: the config is not a JSON object. OSError: a file cannot be read.
    """
    config_path, weights_path = _adapter_paths(path, name)
    config = _read_config(config_path, name)
    return _open_weights(weights_path, name, functools.partial(load_file, device="cpu")), config


def open_adapter_files(path: str | os.PathLike, name: str | None = None) -> tuple[dict[str, StoredTensor], dict]:
    """Like ``load_adapter_files``, but nothing is read until a tensor is indexed (``StoredTensor``),
    so that a rank holding a shard of the experts reads only its slices."""
    config_path, weights_path = _adapter_paths(path, name)
    config = _read_config(config_path, name)
    file = _open_weights(weights_path, name, functools.partial(safe_open, framework="pt", device="cpu"))
    return {key: StoredTensor(file, key) for key in file.keys()}, config
